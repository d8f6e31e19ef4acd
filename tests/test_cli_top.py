"""The top-level ``larv`` entry point: --version, --help written for users, exit statuses."""

import pytest

from larv_jax import __version__
from larv_jax.cli import COMMANDS, main


def test_version_names_package_jax_and_devices(capsys):
    import jax

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"larv {__version__}"
    assert f"jax {jax.__version__}" in out and jax.default_backend() in out


def test_help_is_for_users(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Subcommands live in" not in out
    assert "Merge fine-tuned CLIP" in out and "README.md" in out and "130 interrupted" in out
    assert "143 terminated" in out
    for name in COMMANDS:
        assert name in out


def test_no_command_is_usage_and_unknown_flag_is_2(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["inspect", "x", "--no-such-flag"])
    assert e.value.code == 2


def test_interrupt_exits_130(monkeypatch, tmp_path, capsys):
    import larv_jax.cli.inspect as inspect_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cmd, "run", interrupted)
    assert main(["inspect", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "larv inspect: interrupted"


def test_sigterm_exits_143(monkeypatch, tmp_path, capsys):
    """SIGTERM during a command unwinds like Ctrl-C (outputs' temporaries removed) and exits 143
    with one line; the previous SIGTERM handler is back afterwards."""
    import os
    import signal
    import time

    import larv_jax.cli.inspect as inspect_cmd

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the handler raises at the next bytecode

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(inspect_cmd, "run", terminated)
    assert main(["inspect", str(tmp_path)]) == 143
    assert capsys.readouterr().err.strip() == "larv inspect: terminated"
    assert signal.getsignal(signal.SIGTERM) is before
