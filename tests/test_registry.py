"""The op registry: every op declared once (ryzen_llm/ops/<op>.py), everything else derived."""
import inspect
from pathlib import Path

import pytest
import torch

from ryzen_llm.ops import registry as registry_mod
from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops._spec import OpSpec
from ryzen_llm.ops.dispatch import INFERENCE_OPS, LEVEL_OF_OP, OP_SPECS, KernelSet, resolve

ROOT = Path(__file__).resolve().parents[1]


def _parameters(fn) -> list[str]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    return [p for p in inspect.signature(target).parameters if p != "self"]


def test_dispatch_lists_are_the_declarations():
    assert set(LEVEL_OF_OP) == set(OP_SPECS)
    assert all(LEVEL_OF_OP[n] == s.level for n, s in OP_SPECS.items())
    assert INFERENCE_OPS == {n for n, s in OP_SPECS.items() if s.inference_only}
    levels = [s.level for s in OP_SPECS.values()]
    assert levels == sorted(levels) and set(levels) <= {1, 2, 3, 4}


@pytest.mark.parametrize("name", sorted(OP_SPECS))
def test_reference_takes_the_fused_arguments(name):
    spec = OP_SPECS[name]
    assert spec.summary and spec.name == name
    if spec.reference is None:  # decode_block: the model's composed path is its reference
        assert spec.runs_inside and set(spec.runs_inside) <= set(OP_SPECS)
        return
    fused, ref = _parameters(spec.fused), _parameters(spec.reference)
    if inspect.isclass(spec.fused):
        # an optimizer: its positional arguments are a prefix of the reference's; its own
        # options (FusedAdamW's state_dtype) are keyword-only
        kw_only = inspect.Parameter.KEYWORD_ONLY
        own = {n for n, p in inspect.signature(spec.fused.__init__).parameters.items()
               if p.kind == kw_only}
        positional = [n for n in fused if n not in own]
        assert ref[: len(positional)] == positional
    else:
        assert fused == ref


@pytest.mark.parametrize("level", [0, 1, 2, 3, 4])
def test_kernel_set_binds_each_op_to_its_declared_implementation(level):
    kernels = KernelSet(level)
    for name, spec in OP_SPECS.items():
        fused = kernels.choices[name].impl == "fused"
        assert fused == (extension_loaded() and level >= spec.level)
        assert kernels._fn[name] is (spec.fused if fused else spec.reference)
    optimizer = kernels.adamw([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    assert isinstance(optimizer, OP_SPECS["adamw"].fused if level >= 3 and extension_loaded()
                      else torch.optim.AdamW)


def test_a_name_declared_twice_is_an_error(monkeypatch):
    import ryzen_llm.ops.bias_gelu as bias_gelu

    twin = OpSpec("add_layer_norm", 1, bias_gelu.bias_gelu, None, "a second declaration")
    monkeypatch.setattr(bias_gelu, "SPECS", (*bias_gelu.SPECS, twin))
    registry_mod.registry.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="'add_layer_norm' is declared twice"):
            registry_mod.registry()
    finally:
        monkeypatch.undo()
        registry_mod.registry.cache_clear()
        registry_mod.registry()


def test_readme_op_table_is_the_registry():
    """README.md carries `python -m ryzen_llm.ops.registry`'s table as it is now."""
    assert registry_mod.catalog_markdown() in (ROOT / "README.md").read_text()


def test_an_unknown_override_names_the_ops():
    with pytest.raises(ValueError, match="no_such_op=fused: .*add_layer_norm"):
        resolve(3, overrides={"no_such_op": "fused"})


def test_a_declared_op_without_a_method_runs_through_the_kernel_set():
    """A new op needs no KernelSet method: kernels.<op>(...) runs the chosen implementation and
    counts the call (shown here on an op that has a method, called the generic way)."""
    kernels = KernelSet(0)
    x, bias = torch.randn(3, 8), torch.randn(8)
    generic = KernelSet.__getattr__(kernels, "bias_gelu")
    torch.testing.assert_close(generic(x, bias), OP_SPECS["bias_gelu"].reference(x, bias))
    assert kernels.calls[("bias_gelu", "reference")] == 1
    with pytest.raises(AttributeError, match="no_such_op"):
        kernels.no_such_op
