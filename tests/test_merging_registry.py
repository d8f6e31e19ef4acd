"""The one merge registry: every name, its hyperparameters and defaults, the one options check,
binding, and the places that read it (CLI choices, benchmarks)."""

import numpy as np
import pytest

from larv_jax import tree
from larv_jax.merging import SVC_ALPHA, registry, svc
from larv_jax.models.clip import abstract_params
from larv_jax.models.config import CLIPConfig, VisionConfig

TINY = CLIPConfig(vision=VisionConfig(width=16, layers=2, heads=2, mlp_dim=32, image_size=16,
                                      patch_size=8), name="tiny")

# The defaults as README's methods table and SPEC §4 state them (written out here, not read from
# the functions), with every hyperparameter a method accepts.
EXPECTED = {
    "simple_average": {},
    "task_arithmetic": {"scale": 0.3},
    "ties": {"scale": 0.3, "keep": 0.2, "aggregate": "sum", "cuts": None},
    "ties_paper": {"scale": 1.0, "keep": 0.2, "aggregate": "mean", "cuts": None},
    "dare_task_arithmetic": {"p": 0.5, "key": 0, "masks": None, "then": "task_arithmetic",
                             "scale": 0.3},
    "dare_ties": {"p": 0.5, "key": 0, "masks": None, "then": "ties", "scale": 0.5, "keep": 0.2,
                  "aggregate": "sum", "cuts": None},
    "dare_average": {"p": 0.5, "key": 0, "masks": None, "then": "simple_average"},
    "tsv_m": {"scale": 1.0, "exclude": ()},
    "iso_c": {"scale": 1.0, "exclude": ()},
    "iso_cts": {"scale": 1.5, "common_fraction": 0.8, "exclude": ()},
}


def _tau(k=3, seed=0):
    rng = np.random.default_rng(seed)
    return {p: rng.normal(0, 0.01, (k, *s.shape)).astype(np.float32)
            for p, s in tree.flatten(abstract_params(TINY)).items()}


def test_names_and_defaults():
    assert list(registry.METHODS) == list(EXPECTED)
    for name, want in EXPECTED.items():
        got = registry.hparams(name)
        got.pop("model", None)
        if name == "simple_average" or name == "dare_average":
            got.pop("scale", None)       # None: 1/K, the mean
        assert got == want, name
    # Iso-C's scale follows the backbone (the Iso-C paper's values), 1.0 for any other model
    assert registry.hparams("iso_c", model="ViT-B-32")["scale"] == 1.30
    assert registry.hparams("iso_c", model="ViT-L-14")["scale"] == 1.50
    assert registry.hparams("iso_c", {"scale": 2.0}, model="ViT-L-14")["scale"] == 2.0


def test_options_checked_in_one_place():
    with pytest.raises(ValueError, match=r"ties: unknown hyperparameter\(s\) \['lam'\]; valid: "
                                         r"\['aggregate', 'cuts', 'keep', 'scale'\]"):
        registry.hparams("ties", {"lam": 0.3})
    # DARE takes the options of the merger it hands over to, and only those
    assert registry.hparams("dare_ties", {"keep": 0.1})["keep"] == 0.1
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['keep'\]"):
        registry.hparams("dare_task_arithmetic", {"keep": 0.1})
    with pytest.raises(ValueError, match=r"unknown merge method 'fisher'; valid: \[.*'ties'"):
        registry.bind("fisher")
    with pytest.raises(ValueError, match="unknown option"):
        registry.bind_svc("ties", rank=3)


def test_bind_is_the_method_with_its_hyperparameters():
    tau = _tau()
    for name in registry.METHODS:
        got = registry.bind(name, model="ViT-B-32")(tau)
        want = registry.METHODS[name](tau, **registry.hparams(name, model="ViT-B-32"))
        assert list(got) == list(tau), name
        for p in tau:
            assert got[p].dtype == np.float32
            np.testing.assert_array_equal(got[p], want[p], err_msg=f"{name} {p}")
    # the coefficient is bound: TA is 0.3 * sum_k tau_k, here with scale 0.7 given
    ta = registry.bind("task_arithmetic", scale=0.7)(tau)
    q = "visual/conv1/kernel"
    np.testing.assert_allclose(ta[q], 0.7 * tau[q].astype(np.float64).sum(0), rtol=1e-6)


def test_bind_svc_alpha_defaults():
    tau = _tau(2, seed=1)
    delta = registry.bind("tsv_m")(tau)
    for method in ("tsv_m", "iso_cts", "ties"):
        got = registry.bind_svc(method)(delta, tau)
        want = svc(delta, tau, alpha=SVC_ALPHA[method])
        for p in delta:
            np.testing.assert_array_equal(got[p], np.asarray(want[p], np.float32), err_msg=p)
    assert SVC_ALPHA["tsv_m"] == 1.0 and SVC_ALPHA["iso_cts"] == 0.2


def test_cli_choices_come_from_the_registry(capsys):
    from larv_jax.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--base", "b", "--models", "m", "--method", "fisher", "--out", "o"])
    err = capsys.readouterr().err
    assert "invalid choice: 'fisher'" in err
    for name in registry.METHODS:
        assert f"'{name}'" in err


def test_a_preset_s_defining_options_cannot_be_set(tmp_path, capsys):
    """`--method simple_average --scale 0.5` wrote theta0 + 0.5 sum tau under the name
    simple_average; the options a preset fixes are now an error naming them, in the registry
    and at the CLI (one line, exit 1, nothing written)."""
    import pytest

    from larv_jax.cli import main
    from larv_jax.merging import registry

    with pytest.raises(ValueError, match=r"simple_average: \['scale'\] cannot be set"):
        registry.hparams("simple_average", {"scale": 0.5})
    with pytest.raises(ValueError, match=r"dare_average: \['then'\] cannot be set"):
        registry.hparams("dare_average", {"then": "ties"})
    assert registry.hparams("simple_average") == registry.hparams("simple_average", {})
    out = tmp_path / "m"
    for flags in (["--scale", "0.5"], ["--set", "scale=0.5"]):
        rc = main(["merge", "--base", str(tmp_path / "b"), "--models", str(tmp_path / "f"),
                   "--method", "simple_average", *flags, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and "cannot be set" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
