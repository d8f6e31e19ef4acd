"""Test setup: 2 fake CPU devices, strict dtype promotion, float32 matmuls at full precision."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["LARV_JAX_CACHE_DIR"] = "off"  # in-process CLI calls: no compilation cache in ~/.cache

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def _two_devices():
    assert len(jax.devices()) == 2, "tests expect 2 fake CPU devices (XLA_FLAGS set too late?)"
