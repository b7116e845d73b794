import subprocess
import sys

import pytest

from ryzen_llm import doctor
from ryzen_llm.ops._extension import extension_loaded


def test_doctor_reports_and_passes_on_this_machine(capsys):
    code = doctor.main([])
    out = capsys.readouterr().out
    assert "CPU flags:" in out and "torch:" in out
    if extension_loaded():
        assert code == 0
        assert "[PASS] cpu  add_layer_norm" in out
        assert "[PASS] cpu  int8 GEMM (level 4)" in out and "torch._int_mm: exact" in out
    else:
        assert code == 1 and "NOT LOADED" in out


def test_doctor_fails_when_a_requested_device_is_missing(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert doctor.main(["--device", "cuda"]) == 1
    assert "no CUDA device" in capsys.readouterr().out


def test_doctor_fails_when_a_fused_op_is_wrong(monkeypatch, capsys):
    if not extension_loaded():
        pytest.skip("extension not built")
    import dataclasses

    from ryzen_llm.ops.dispatch import OP_SPECS

    spec = OP_SPECS["add_layer_norm"]
    wrong = dataclasses.replace(spec, reference=lambda *a: tuple(t * 1.01 for t in spec.reference(*a)))
    monkeypatch.setitem(OP_SPECS, "add_layer_norm", wrong)
    assert doctor.main([]) == 1
    assert "[FAIL] cpu  add_layer_norm" in capsys.readouterr().out


def test_model_validate_command():
    out = subprocess.run(
        [sys.executable, "-m", "ryzen_llm.model", "--validate", "--batch", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[PASS] parameters: 10,509,312" in out.stdout
    assert "[FAIL]" not in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dladdr on a Linux build")
def test_extension_uses_the_shared_libstdcxx():
    """A compiler that links libstdc++ statically gives the extension a second copy of its locale
    code beside torch's, which crashed on integer formatting in error messages (CUDA machine,
    CXX=/opt/gcc/bin/g++); this build resolves its stream code in the shared library."""
    if not extension_loaded():
        pytest.skip("extension not built")
    from ryzen_llm.ops._extension import embeds_libstdcxx, libstdcxx_owner

    assert "libstdc++" in (libstdcxx_owner() or "")
    assert embeds_libstdcxx() is False


def test_doctor_fails_on_an_extension_with_its_own_libstdcxx(monkeypatch, capsys):
    if not extension_loaded():
        pytest.skip("extension not built")
    monkeypatch.setattr(doctor, "embeds_libstdcxx", lambda: True)
    assert doctor.main(["--device", "cpu"]) == 1
    assert "carries its own copy of libstdc++" in capsys.readouterr().out
