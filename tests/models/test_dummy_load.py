"""--load-format dummy (SGLang's and vLLM's name): a checkpoint folder with
its config and tokenizer but no weight files serves random weights of the
real shape, the same every run, and without it the missing weights are
a clear error."""

import shutil

import pytest

import pyvlm
from pyvlm.models.checkpoint import CheckpointError


def config_only(checkpoint, folder):
    shutil.copytree(checkpoint, folder)
    for path in list(folder.glob("*.safetensors")) + list(folder.glob("*.index.json")):
        path.unlink()
    return folder


def engine(folder, **args):
    return pyvlm.Engine(model=str(folder), device="cpu", dtype="float32", page_size=4,
                        max_total_tokens=2048, **args)


@pytest.mark.parametrize("name", ["qwen2", "mllama", "llava_original"])
def test_dummy_weights_serve_the_shape_without_weight_files(request, name, tmp_path):
    folder = config_only(request.getfixturevalue(f"tiny_checkpoint_{name}"), tmp_path / name)
    with pytest.raises(CheckpointError, match="has no weights"):
        engine(folder)
    outputs = []
    for _ in range(2):
        with engine(folder, load_format="dummy") as eng:
            parameters = list(eng.state.model.parameters())
            assert all(p.abs().max() <= 1e-3 and p.abs().max() > 0 for p in parameters)
            outputs.append(eng.generate("the cat sat", {"max_new_tokens": 4,
                                                        "temperature": 0})["output_ids"])
    assert len(outputs[0]) == 4 and outputs[0] == outputs[1]


def test_an_unknown_load_format_is_refused(tiny_checkpoint_qwen2):
    with pytest.raises(ValueError, match="load_format 'npz'"):
        engine(tiny_checkpoint_qwen2, load_format="npz")


def test_the_flag_reaches_the_engine_and_is_checked():
    from pyvlm.cli import build_server_parser
    from pyvlm.server.args import server_args_from

    parser = build_server_parser()
    args = server_args_from(parser.parse_args(["--load-format", "dummy"]))
    assert args.engine_kwargs()["load_format"] == "dummy"
    with pytest.raises(ValueError, match="--load-format must be auto or dummy"):
        server_args_from(parser.parse_args(["--load-format", "pt"]))
