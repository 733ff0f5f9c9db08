"""A tiny llama whose greedy output is scripted: each token deterministically picks the next.

With every layer's output projections zeroed, the last hidden state is the (normed) embedding of
the current token, so the logits depend on that token only. Giving each scripted token a one-hot
embedding and the lm_head a matching row makes `a -> b` the model's clear favourite, while every
other row stays random and small. The weights are real MLX weights, loaded by mlx_lm like any
model; only what they say is known in advance. It is a Qwen3-shaped reasoning model: its
tokenizer (SmolLM2's, plus `<think>`/`</think>`) has thinking markers and its chat template
closes an empty thinking block when `enable_thinking` is false, as Qwen3's does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.modelfiles import SMOLLM2_VOCAB_SIZE, TOKENIZER_FILES, smollm2_mlx_dir

THINK, END_THINK = SMOLLM2_VOCAB_SIZE, SMOLLM2_VOCAB_SIZE + 1  # ids of the added markers
EOS = 2  # <|im_end|>
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}")


def _tokenizer_files(dst: Path) -> None:
    src = smollm2_mlx_dir()
    for name in TOKENIZER_FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    tok = json.loads((dst / "tokenizer.json").read_text())
    for i, content in ((THINK, "<think>"), (END_THINK, "</think>")):
        tok["added_tokens"].append({"id": i, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False})
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_scripted_thinker(dst: Path, answer: str, *, thought: str = " Hmm") -> Path:
    """Greedy output: `<think>{thought}</think>{answer}` then end of turn; with thinking off
    (the template's empty block in the prompt) just `{answer}`. Every token of the script must be
    distinct, since each token alone decides the next."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama
    from transformers import AutoTokenizer

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _tokenizer_files(dst)
    tok = AutoTokenizer.from_pretrained(str(dst))
    def prompt(thinking: bool) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                       enable_thinking=thinking, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    opened, closed = prompt(True), prompt(False)
    thought_ids = tok.encode(thought, add_special_tokens=False)
    answer_ids = tok.encode(answer, add_special_tokens=False)
    script = [opened[-1], THINK, *thought_ids, END_THINK, *answer_ids, EOS]
    transitions = dict(zip(script, script[1:]))
    transitions[closed[-1]] = answer_ids[0]
    if len(set(script[:-1])) != len(script) - 1 or closed[-1] in script[:-1]:
        raise ValueError(f"scripted tokens must be distinct: {tok.convert_ids_to_tokens(script)}")

    hidden, vocab = 64, SMOLLM2_VOCAB_SIZE + 8
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": 1, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 2048, "vocab_size": vocab, "tie_word_embeddings": False,
              "torch_dtype": "float16"}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(0), len(params))
    weights = {}
    for key, (name, p) in zip(keys, params.items()):
        if name.endswith("norm.weight"):
            weights[name] = mx.ones(p.shape)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = mx.zeros(p.shape)  # the residual stream carries the embedding alone
        else:
            weights[name] = mx.random.normal(p.shape, key=key) * 0.02
    embed = np.array(weights["model.embed_tokens.weight"])
    head = np.array(weights["lm_head.weight"])
    for slot, (a, b) in enumerate(transitions.items()):
        embed[int(a)] = 0.0
        embed[int(a), slot] = 1.0
        head[int(b), slot] += 10.0
    weights["model.embed_tokens.weight"] = mx.array(embed)
    weights["lm_head.weight"] = mx.array(head)
    model.update(tree_unflatten([(k, v.astype(mx.float16)) for k, v in weights.items()]))
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
