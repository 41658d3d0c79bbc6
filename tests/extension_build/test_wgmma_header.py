"""csrc/kernels/cuda/wgmma_instructions.cuh is what wgmma_gen.py writes
(the wrappers are generated: inline PTX names every accumulator register)."""

import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_KERNELS = os.path.join(ROOT, "csrc", "kernels", "cuda")


def generator():
    spec = importlib.util.spec_from_file_location(
        "wgmma_gen", os.path.join(CUDA_KERNELS, "wgmma_gen.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_header_is_the_generator_output():
    with open(os.path.join(CUDA_KERNELS, "wgmma_instructions.cuh")) as f:
        assert f.read() == generator().header(), \
            "regenerate: python csrc/kernels/cuda/wgmma_gen.py > csrc/kernels/cuda/wgmma_instructions.cuh"


def test_every_wrapper_names_each_accumulator_once():
    """An m64nN wrapper lists N / 2 accumulators, %0 .. %(N/2 - 1), each bound
    to d[i] in order, and its operands follow them."""
    text = generator().header()
    wrappers = re.findall(r"wgmma_(ss|ss_set|rs_bt)<(\d+), (\w+)>\(float \(&d\)\[(\d+)\]"
                          r".*?\"\{(%[^}]*)\}.*?: (.*?)\n      : (.*?)\);", text, re.S)
    assert len(wrappers) == 3 * 4 * 2
    for kind, width, _, count, registers, outputs, inputs in wrappers:
        m = int(width) // 2
        assert int(count) == m
        assert registers.split(", ") == [f"%{i}" for i in range(m)]
        bound = re.findall(r'"[+=]f"\(d\[(\d+)\]\)', outputs)
        assert [int(i) for i in bound] == list(range(m))
        assert inputs.count('"l"') == (2 if kind.startswith("ss") else 1)
