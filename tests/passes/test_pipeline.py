from dataclasses import dataclass
from typing import Literal

import pytest

from slimgraph.errors import PassError
from slimgraph.passes import Pass, PassResult, available, function_pass, parse_pipeline, register_pass, to_passes


@register_pass
@dataclass
class _Options(Pass):
    name = "test-options"
    description = "a pass with one option of each kind, for parser tests"
    ratio: float = 0.5
    steps: int = 1
    mode: Literal["l1", "l2"] = "l1"
    verbose: bool = False
    ignore: list[str] | None = None

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise PassError(f"pass {self.name!r} option 'ratio': {self.ratio} is outside [0, 1)")

    def run(self, graph, ctx):
        return PassResult(False)


def test_available_lists_builtin_passes_with_descriptions():
    passes = available()
    assert {"dce", "remove-identity"} <= set(passes)
    assert all(passes.values())


def test_pipeline_string_with_typed_options():
    dce, opts = parse_pipeline("dce, test-options{ratio=0.25,steps=3,mode=l2,verbose=true,ignore=[fc,conv1]}")
    assert dce.name == "dce"
    assert (opts.ratio, opts.steps, opts.mode, opts.verbose, opts.ignore) == (0.25, 3, "l2", True, ["fc", "conv1"])
    assert str(opts) == "test-options{ratio=0.25,steps=3,mode=l2,verbose=True,ignore=[fc,conv1]}"


@pytest.mark.parametrize("text,message", [
    ("dce,nope", "unknown pass 'nope'"),
    ("test-options{colour=red}", "no option 'colour'"),
    ("test-options{ratio=abc}", "option 'ratio'.*not a float"),
    ("test-options{ratio=1.5}", "option 'ratio'.*outside"),
    ("test-options{mode=l3}", "not one of l1, l2"),
    ("test-options{steps=2.5}", "option 'steps'"),
    ("test-options{verbose=maybe}", "not a boolean"),
    ("test-options{ratio}", "not key=value"),
    ("test-options{ratio=0.1", "unbalanced"),
    ("dce,,dce", "empty pass name"),
])
def test_bad_pipelines_name_the_cause(text, message):
    with pytest.raises(PassError, match=message):
        parse_pipeline(text)


def test_to_passes_accepts_names_objects_and_classes():
    passes = to_passes(["dce", _Options(ratio=0.1), _Options, "remove-identity{}"])
    assert [p.name for p in passes] == ["dce", "test-options", "test-options", "remove-identity"]
    with pytest.raises(PassError, match="cannot use 3"):
        to_passes([3])


def test_function_pass_decorator():
    @function_pass("test-noop", "does nothing", register=False)
    def noop(graph, ctx):
        return False

    p = noop()
    assert p.name == "test-noop" and p.run(None, None) == PassResult(False)
