"""RMSNorm (plain and fused with the residual add) and the gated MLP against
transformers' Llama modules."""

import torch

from pyvlm.layers.mlp import GatedMLP
from pyvlm.layers.norm import RMSNorm


def test_rms_norm_matches_llama_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(48))
    norm = RMSNorm(48, eps=1e-5)
    norm.weight.data.copy_(ref.weight)
    x, residual = torch.randn(5, 48), torch.randn(5, 48)
    torch.testing.assert_close(norm(x), ref(x), atol=1e-6, rtol=1e-5)
    out, new_residual = norm(x.clone(), residual.clone())
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(out, ref(x + residual), atol=1e-6, rtol=1e-5)


def test_gated_mlp_matches_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    ref = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, mlp_bias=True))
    for param in ref.parameters():
        param.data.normal_()
    mlp = GatedMLP(32, 80, bias=True)
    for name in ("gate_proj", "up_proj"):
        for kind in ("weight", "bias"):
            param = getattr(mlp.gate_up_proj, kind)
            param.weight_loader(param, getattr(getattr(ref, name), kind).data, name)
    mlp.down_proj.load_state_dict(ref.down_proj.state_dict())
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref(x), atol=1e-4, rtol=1e-5)
