"""Run our checkpoint and a Hugging Face directory on the same tokens and compare the logits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from hyperp_megatron.convert import ours

DEFAULT_TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are "
    "all resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius "
    "Marcius is chief enemy to the people."
)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Parity of two logits tensors [..., V] over the same tokens.

    max_rel_error: max over tokens of ||l_ref - l_cand|| / ||l_ref||; kl: mean over tokens of
    KL(softmax(l_ref) || softmax(l_cand)); top1_agreement: fraction of tokens with the same argmax.
    """
    ref = reference.reshape(-1, reference.shape[-1]).double()
    cand = candidate.reshape(-1, candidate.shape[-1]).double()
    if ref.shape != cand.shape:
        raise ValueError(f"logits shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    rel = (ref - cand).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)
    log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(cand, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return {"max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean()), "kl": float(kl.mean()),
            "max_kl": float(kl.max()), "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).double().mean()),
            "tokens": int(ref.shape[0])}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remote_code_allowed(hf_dir: Path, trust_remote_code: bool = False) -> bool:
    """Whether loading ``hf_dir`` may run the Python files it ships (``auto_map`` in config.json).

    Without ``trust_remote_code`` only our own ``hyperp`` export qualifies: its config.json has the
    ``hyperp_megatron`` block with target ``hyperp``, ``auto_map`` names only ``modeling_hyperp``, and the
    directory's Python files are exactly ``modeling_hyperp.py`` with the hash of the file this version ships.
    Any other code is a ValueError (one line): pass --trust-remote-code if you trust it."""
    from hyperp_megatron.convert.export import BLOCK
    from hyperp_megatron.convert.hyperp import MODELING_FILE
    from hyperp_megatron.convert.importer import read_hf_config

    config = read_hf_config(hf_dir)
    auto_map = config.get("auto_map")
    python_files = sorted(p.name for p in hf_dir.glob("*.py"))
    if not auto_map:
        return False  # a standard class: transformers runs none of the directory's files
    if trust_remote_code:
        return True
    block = config.get(BLOCK)
    modules = {str(ref).split("--")[-1].rsplit(".", 1)[0]
               for refs in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
               for ref in (refs if isinstance(refs, list) else [refs]) if ref}
    ours_exactly = (isinstance(block, dict) and block.get("target") == "hyperp"
                    and modules == {MODELING_FILE.stem} and python_files == [MODELING_FILE.name]
                    and _sha256(hf_dir / MODELING_FILE.name) == _sha256(MODELING_FILE))
    if not ours_exactly:
        raise ValueError(f"{hf_dir}/config.json asks to run Python code ({', '.join(python_files) or 'auto_map'}) "
                         f"that is not this version's hyperp export: pass --trust-remote-code only if you trust it")
    return True


def load_hf(hf_dir: str | Path, attn_implementation: str = "eager", dtype: torch.dtype | None = None,
            trust_remote_code: bool = False):
    """``AutoModelForCausalLM`` from a local directory (offline), eval mode. Code shipped in the directory runs
    only for our own hyperp export or with ``trust_remote_code`` (:func:`remote_code_allowed`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    allowed = remote_code_allowed(hf_dir, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=allowed, local_files_only=True,
                                                 attn_implementation=attn_implementation, dtype=dtype or "auto")
    return model.eval()


def sample_tokens(hf_dir: Path, vocab_size: int, text: str | None, batch: int, seq_length: int,
                  seed: int = 0) -> torch.Tensor:
    """[batch, seq_length] token ids: ``text`` (repeated to fill, tokenized by the export's tokenizer) in the
    first row and seeded random ids in the others; random ids only when ``text`` is None."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seq_length), generator=generator)
    if text:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)(text)["input_ids"]
        if not ids:
            raise ValueError("--text encodes to no tokens")
        tokens[0] = torch.tensor((ids * (seq_length // len(ids) + 1))[:seq_length])
    return tokens


@torch.no_grad()
def verify(checkpoint: str | Path, hf_dir: str | Path, text: str | None = DEFAULT_TEXT, batch: int = 2,
           seq_length: int | None = None, attn_implementation: str = "eager", trust_remote_code: bool = False) -> dict:
    """Logits parity of our checkpoint (fp32, one process) and the HF directory (its saved dtype)."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "config.json").is_file():
        remote_code_allowed(hf_dir, trust_remote_code)  # refuses foreign code before any heavy work
    source = ours.describe(checkpoint)
    hf_model = load_hf(hf_dir, attn_implementation, trust_remote_code=trust_remote_code)
    if hf_model.config.vocab_size != source.vocab_size:
        raise ValueError(f"vocab mismatch: {hf_dir} has vocab_size {hf_model.config.vocab_size}, the checkpoint "
                         f"{source.vocab_size}")
    seq_length = seq_length or min(source.cfg.model.seq_length, 256)
    tokens = sample_tokens(hf_dir, source.vocab_size, text, batch, seq_length)
    with ours.single_process_world(source.cfg.train.seed) as pg_collection:
        model = ours.load(source, pg_collection)
        reference = ours.logits(model, tokens, source.vocab_size)
    candidate = hf_model(input_ids=tokens).logits.float()
    return {**compare(reference, candidate), "hf_dtype": str(next(hf_model.parameters()).dtype).removeprefix("torch."),
            "architecture": type(hf_model).__name__, "attn_implementation": attn_implementation}
