"""Transformer building blocks shared by the image and text towers, and the rule of which parameters
training leaves undecayed (:func:`no_weight_decay_names`, for any model built of them)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Longest sequence for which compiled low-precision CPU inference uses the batched-matmul attention.
MATMUL_ATTENTION_MAX_TOKENS = 768


def _compiling_on_cpu(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (``gelu_pytorch_tanh``).

    Under ``torch.compile`` on CPU it is written as x * sigmoid(2u), the same function as
    0.5 x (1 + tanh(u)): inductor vectorises exp far better than tanh, and this form runs about 2.5x
    faster there; eager mode keeps PyTorch's own kernel, which is the fastest eager form.
    """
    if _compiling_on_cpu(x):
        xf = x.float()
        u = math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)
        return (xf * torch.sigmoid(2.0 * u)).to(x.dtype)
    return F.gelu(x, approximate="tanh")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of (B, H, N, hd) queries, keys and values -> (B, H, N, hd).

    ``F.scaled_dot_product_attention``, except for compiled bf16/fp16 inference on CPU over at most
    ``MATMUL_ATTENTION_MAX_TOKENS`` tokens: there two batched matmuls around an fp32 softmax, which
    inductor fuses with the scaling and the casts, beat PyTorch's CPU flash kernel (about 1.6x at
    196 tokens, 1.5x at 729; slower from about 1000 tokens, and the (B, H, N, N) scores it
    materialises would cost memory in training, so neither case uses it).
    """
    n = q.shape[-2]
    if (
        _compiling_on_cpu(q)
        and q.dtype in (torch.bfloat16, torch.float16)
        and not torch.is_grad_enabled()
        and n <= MATMUL_ATTENTION_MAX_TOKENS
    ):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, N, N)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.float().softmax(dim=-1).to(q.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)


def activation(name: str):
    """The MLP non-linearity named as in transformers' configs."""
    if name == "gelu_pytorch_tanh":
        return gelu_tanh
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}")


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows ordered q, k, v)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        out = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, eps: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """A stack of blocks that can stop early and keep every hidden state."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, act: str, eps: float, dropout=0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim, act, eps, dropout) for _ in range(depth))
        self.gradient_checkpointing = False

    @classmethod
    def from_config(cls, config) -> Encoder:
        """The blocks of a tower config (image or text: the fields they share)."""
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.hidden_act,
            config.layer_norm_eps,
            config.attention_dropout,
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start`` to ``end`` (all by default); append their outputs to ``hidden_states``."""
        for block in self.blocks[start:end]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


class AttentionPoolHead(nn.Module):
    """SigLIP's multi-head attention pooling ("MAP") head: one learned probe attends to all tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)

    def no_weight_decay(self) -> set[str]:
        """Parameters (besides biases and norms) that training should not decay: the learned probe."""
        return {"probe"}

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) tokens -> (B, D); ``key_mask`` (B, N), True for tokens the probe may attend to."""
        B, N, D = x.shape
        hd = D // self.num_heads
        q = self.q(self.probe).view(1, self.num_heads, 1, hd).expand(B, -1, -1, -1)  # (B, H, 1, hd)
        kv = self.kv(x).view(B, N, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, H, N, hd)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, hd)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, D))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]  # (B, D)


def lecun_normal_(weight: torch.Tensor) -> None:
    """jax.nn.initializers.lecun_normal: a normal truncated at 2 std, variance 1/fan_in."""
    std = math.sqrt(1.0 / weight[0].numel()) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=1.0, a=-2.0, b=2.0)
    weight.mul_(std)


@torch.no_grad()
def init_encoder_weights(module: nn.Module) -> None:
    """The initialisation of big_vision's ViT, as transformers applies it to SigLIP."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            lecun_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, Attention):
            for part in m.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(part)
            nn.init.xavier_uniform_(m.proj.weight)
        elif isinstance(m, MLP):
            nn.init.xavier_uniform_(m.fc1.weight)
            nn.init.xavier_uniform_(m.fc2.weight)
            nn.init.normal_(m.fc1.bias, std=1e-6)
            nn.init.normal_(m.fc2.bias, std=1e-6)
        elif isinstance(m, AttentionPoolHead):
            nn.init.xavier_uniform_(m.probe.view(1, -1))
            dim = m.q.weight.shape[0]
            in_proj = nn.init.xavier_uniform_(torch.empty(3 * dim, dim))  # as nn.MultiheadAttention
            m.q.weight.copy_(in_proj[:dim])
            m.kv.weight.copy_(in_proj[dim:])
            nn.init.zeros_(m.q.bias)
            nn.init.zeros_(m.kv.bias)


def no_weight_decay_names(model: nn.Module, *, own: bool = True) -> set[str]:
    """Names of ``model``'s parameters that training should not decay: every 0/1-d tensor (biases, norms,
    t', b; their real shape under ZeRO-3, which empties them) and what each sub-module names in its own
    ``no_weight_decay()`` (position tables, probes, learned queries); ``own``: the model's own
    ``no_weight_decay()`` too (False for a model whose ``no_weight_decay()`` is this function)."""
    names = {n for n, p in model.named_parameters() if len(getattr(p, "ds_shape", p.shape)) < 2}
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed) and (own or module is not model):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names
