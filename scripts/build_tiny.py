"""Build the embedded default assets: chat data set, tokenizer and tiny Llama 4 MoE base model.

    python scripts/build_tiny.py all        # data + tokenizer + pretrain (about 10 minutes on 2 CPU cores)
    python scripts/build_tiny.py data       # moefit/assets/data/chat_{train,eval}.jsonl
    python scripts/build_tiny.py tokenizer  # byte-level BPE + chat template -> moefit/assets/tiny/
    python scripts/build_tiny.py pretrain   # pretrain the tiny model on scripts/tiny_corpus prose
    python scripts/build_tiny.py sanity     # short full fine-tune on chat_train, reports chat_eval loss

Everything is seeded; the source text lives in scripts/tiny_corpus/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from tiny_corpus import prose  # noqa: E402
from tiny_corpus.chat_topics import LINKS, SYSTEM_CUSTOMER, SYSTEM_STAFF, TOPICS  # noqa: E402

from moefit.assets import chat_eval_path, chat_train_path, tiny_model_dir  # noqa: E402

SEED = 1234
EVAL_PERCENT = 12
VOCAB_SIZE = 3072
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|pad|>"]
# Llama 3/4 pre-tokenizer pattern: newlines form their own piece (`\s*[\r\n]+`), so "\n\n" after a header
# tokenizes the same whether or not content follows; prefix renderings then tokenize to true prefixes.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' + content | trim + '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,  # each routed expert and the shared expert
    intermediate_size_mlp=256,  # dense MLP width; unused because every layer is MoE
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=4,
    num_experts_per_tok=1,
    moe_layers=[0, 1, 2, 3],
    no_rope_layers=[1, 1, 1, 0],  # 0 = NoPE: the last layer has no rotary embedding, as every 4th in Scout
    use_qk_norm=True,
    attention_chunk_size=512,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
PRETRAIN = dict(seq_len=256, batch_size=8, steps=400, lr=3e-3, warmup=30, min_lr_ratio=0.1, weight_decay=0.1)


# --------------------------------------------------------------------------- data
def _conv_key(conv: dict) -> str:
    return json.dumps(conv["messages"], ensure_ascii=False, sort_keys=True)


def _system(rng: random.Random, audience: str) -> list[dict]:
    if rng.random() >= 0.3:
        return []
    pool = SYSTEM_CUSTOMER if audience == "customer" else SYSTEM_STAFF
    return [{"role": "system", "content": rng.choice(pool)}]


def _join(link: str, question: str) -> str:
    return link + (question[0].lower() + question[1:] if link.endswith(": ") else question)


def build_conversations(seed: int = SEED) -> list[dict]:
    """All conversations: every phrasing alone, every follow-up after its topic, and topic pairs/triples."""
    rng = random.Random(seed)
    convs: list[dict] = []

    def add(audience: str, turns: list[tuple[str, str]]) -> None:
        msgs = _system(rng, audience)
        for q, a in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        convs.append({"messages": msgs})

    for t in TOPICS:
        for q in t["q"]:
            add(t["audience"], [(q, rng.choice(t["a"]))])
    for t in TOPICS:
        for fq, fa in t["follow"]:
            add(t["audience"], [(rng.choice(t["q"]), rng.choice(t["a"])), (fq, fa)])
    by_audience = {aud: [t for t in TOPICS if t["audience"] == aud] for aud in ("customer", "staff")}
    for _ in range(170):
        aud = "customer" if rng.random() < 0.65 else "staff"
        first, second = rng.sample(by_audience[aud], 2)
        turns = [(rng.choice(first["q"]), rng.choice(first["a"]))]
        if first["follow"] and rng.random() < 0.4:
            turns.append(rng.choice(first["follow"]))
        turns.append((_join(rng.choice(LINKS), rng.choice(second["q"])), rng.choice(second["a"])))
        add(aud, turns)
    unique: dict[str, dict] = {}
    for c in convs:
        unique.setdefault(_conv_key(c), c)
    return list(unique.values())


def split_conversations(convs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Deterministic split by a hash of the conversation: stable when conversations are added."""
    train, held = [], []
    for c in convs:
        h = int(hashlib.sha256(_conv_key(c).encode()).hexdigest(), 16)
        (held if h % 100 < EVAL_PERCENT else train).append(c)
    return train, held


def _write_jsonl(path: Path, convs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")


def cmd_data() -> None:
    convs = build_conversations()
    train, held = split_conversations(convs)
    _write_jsonl(chat_train_path(), train)
    _write_jsonl(chat_eval_path(), held)
    n_multi = sum(sum(m["role"] == "user" for m in c["messages"]) > 1 for c in convs)
    n_sys = sum(c["messages"][0]["role"] == "system" for c in convs)
    size = chat_train_path().stat().st_size + chat_eval_path().stat().st_size
    print(f"data: {len(convs)} conversations ({n_multi} multi-turn, {n_sys} with a system message): "
          f"{len(train)} train, {len(held)} eval, {size / 1024:.0f} KiB")


# --------------------------------------------------------------------------- pretraining text
def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template, in Python; used before the tokenizer exists (checked against it in tests)."""
    out = SPECIAL_TOKENS[0]
    for m in messages:
        out += f"<|header_start|>{m['role']}<|header_end|>\n\n{m['content'].strip()}<|eot|>"
    if add_generation_prompt:
        out += "<|header_start|>assistant<|header_end|>\n\n"
    return out


def pretrain_documents(seed: int = SEED) -> list[str]:
    """Prose documents (bos ... end_of_text) and general chat dialogues; never the chat data set."""
    rng = random.Random(seed + 1)
    docs = [f"<|begin_of_text|>{' '.join(t.split())}<|end_of_text|>"
            for t in prose.HANDBOOK + prose.STORIES + prose.EVERYDAY + prose.business_notes(rng)]
    qa = list(prose.GENERAL_QA) + prose.generated_qa(rng, 500) + prose.venue_qa(rng, 800)
    rng.shuffle(qa)
    i = 0
    while i < len(qa):
        n = rng.choice([1, 1, 2, 3])
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": "You are a helpful assistant."})
        for q, a in qa[i:i + n]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        docs.append(render(msgs))
        i += n
    return docs


# --------------------------------------------------------------------------- tokenizer
def cmd_tokenizer() -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    train, _ = split_conversations(build_conversations())
    texts = [m["content"] for c in train for m in c["messages"]]
    texts += pretrain_documents()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS[0]
    tk.post_processor = processors.TemplateProcessing(  # like Llama's tokenizer: plain encode adds bos
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token="<|eot|>", pad_token="<|pad|>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"], clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    out = tiny_model_dir()
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    # Name the class every transformers release knows ("TokenizersBackend" is new in 5.x).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"tokenizer: vocab {len(tok)} -> {out}")


# --------------------------------------------------------------------------- model
def build_config(tok):
    from transformers import Llama4TextConfig

    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           [("bos", "<|begin_of_text|>"), ("eos", "<|eot|>"), ("pad", "<|pad|>")]}
    return Llama4TextConfig(vocab_size=len(tok), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                            pad_token_id=ids["pad"], **MODEL_SHAPE)


def _token_stream(tok) -> list[int]:
    stream: list[int] = []
    for d in pretrain_documents():
        stream += tok(d, add_special_tokens=False)["input_ids"]
    return stream


def cmd_pretrain(steps: int) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Llama4ForCausalLM

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    out = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(out)
    config = build_config(tok)
    model = Llama4ForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    stream = torch.tensor(_token_stream(tok))
    cfg = PRETRAIN
    L, B = cfg["seq_len"], cfg["batch_size"]
    print(f"pretrain: {n_params:,} parameters, corpus {len(stream):,} tokens, {steps} steps of {B}x{L} tokens "
          f"({steps * B * L / len(stream):.1f} epochs)")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg["warmup"]:
            return cfg["lr"] * (step + 1) / cfg["warmup"]
        frac = (step - cfg["warmup"]) / max(1, steps - cfg["warmup"])
        return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac)))

    t0 = time.time()
    avg = None
    for step in range(steps):
        starts = [rng.randrange(0, len(stream) - L - 1) for _ in range(B)]
        x = torch.stack([stream[s:s + L] for s in starts])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  avg {avg:.4f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
    elapsed = time.time() - t0
    usage = expert_usage(model, stream[: 16 * L].view(16, L))
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=128).save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"pretrain: done in {elapsed:.0f}s, final avg loss {avg:.4f}, {n_params:,} parameters, "
          f"dir {size / 1e6:.2f} MB; expert token share per layer: {usage}")


def expert_usage(model, x) -> list[list[float]]:
    """Fraction of tokens the top-1 router sends to each expert, per layer (collapsed routing shows here)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=x, output_router_logits=True).router_logits
    out = []
    for lg in logits:
        counts = torch.bincount(lg.argmax(-1).flatten(), minlength=lg.shape[-1]).float()
        out.append([round(v, 2) for v in (counts / counts.sum()).tolist()])
    return out


# --------------------------------------------------------------------------- sanity fine-tune
def assistant_tokens(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels (-100 outside assistant replies, by prefix rendering)."""
    ids = tok.apply_chat_template(messages, tokenize=False)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"])
        end = len(tok(tok.apply_chat_template(messages[: i + 1], tokenize=False),
                      add_special_tokens=False)["input_ids"])
        labels[start:end] = ids[start:end]
    return ids, labels


def _load_chat(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]


def eval_loss(model, examples) -> float:
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, labels in examples:
            x, y = torch.tensor([ids]), torch.tensor([labels])
            n = int((y[:, 1:] != -100).sum())
            total += model(input_ids=x, labels=y).loss.item() * n
            count += n
    model.train()
    return total / count


def cmd_sanity(seconds: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).train()
    train = [assistant_tokens(tok, m) for m in _load_chat(chat_train_path())]
    held = [assistant_tokens(tok, m) for m in _load_chat(chat_eval_path())]
    print(f"sanity: {len(train)} train / {len(held)} eval conversations, "
          f"{sum(len(i) for i, _ in train):,} train tokens; eval loss before {eval_loss(model, held):.4f}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng = random.Random(SEED)
    pad = tok.pad_token_id
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        batch = rng.sample(train, 8)
        n = max(len(i) for i, _ in batch)
        x = torch.tensor([i + [pad] * (n - len(i)) for i, _ in batch])
        y = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in batch])
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            print(f"step {step:4d}  train loss {loss.item():.4f}  {time.time() - t0:5.1f}s", flush=True)
        step += 1
    print(f"sanity: {step} steps in {time.time() - t0:.0f}s; eval loss after {eval_loss(model, held):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["data", "tokenizer", "pretrain", "all", "sanity"])
    ap.add_argument("--steps", type=int, default=PRETRAIN["steps"], help="pretraining steps")
    ap.add_argument("--seconds", type=float, default=75.0, help="sanity fine-tune duration")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 is faster when other jobs share the cores)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.what in ("data", "all"):
        cmd_data()
    if args.what in ("tokenizer", "all"):
        cmd_tokenizer()
    if args.what in ("pretrain", "all"):
        cmd_pretrain(args.steps)
    if args.what == "sanity":
        cmd_sanity(args.seconds)


if __name__ == "__main__":
    main()
