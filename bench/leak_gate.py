"""The leak gate on a real model: what holding p(new tokens | old context) under a bound costs.

On stories260k (a pretrained Llama, vocab 512, tied embeddings) a new token ``glorp`` is
added as an exact synonym of an existing single-token word (default ``▁happy``): its input
and output rows are that word's rows, its bias 0, and it can be generated
(``block_output=False``).  Its leak after a context is then close to the probability of the
word itself, so old text loses mass wherever the word is likely.  For each bound and each
statistic, ``llm.calibrate_leak`` sets the offset on the new logit from a reference corpus
(TinyStories paragraphs), and the script prints:

- the offset, and on the reference corpus the leak statistic and the forgetting (mean
  ``-log(1 - leak)``, nats per token) before and after;
- on held-out paragraphs (not used by the gate): leak max and forgetting after, from
  ``llm.verify_no_forgetting`` (old logits bitwise equal is checked there too);
- the new token's own loss (mean NLL where ``glorp`` is the target) on held-out paragraphs
  in which the word is replaced by ``glorp``, before and after: the price of the bound.

    python bench/leak_gate.py --model /work/shared/models/stories260k \\
        --data /work/shared/data/tinystories-sample.txt
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from markovmem import llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="stories260k directory (weights + tokenizer)")
    ap.add_argument("--data", required=True, help="TinyStories text, paragraphs separated by blank lines")
    ap.add_argument("--word", default="happy", help="the single-token word the new token duplicates")
    ap.add_argument("--n", type=int, default=100, help="reference paragraphs (and as many held out)")
    ap.add_argument("--max-len", type=int, default=128, help="tokens kept per paragraph")
    ap.add_argument("--bounds", default="0.1,0.01", help="max_leak values")
    ap.add_argument("--statistics", default="max,p99,mean", help="statistics the bound applies to")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    base = copy.deepcopy(model)
    word_ids = tok(f"a {args.word}", add_special_tokens=False)["input_ids"][1:]
    if len(word_ids) != 1:
        raise SystemExit(f"{args.word!r} is {len(word_ids)} tokens in this vocabulary; pick a single-token word")
    (w,) = word_ids
    with open(args.data, encoding="utf-8") as f:
        paras = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    ref = [tok(p)["input_ids"][: args.max_len] for p in paras[: args.n]]
    held = [tok(p)["input_ids"][: args.max_len] for p in paras[args.n : 2 * args.n]]

    rows = model.get_input_embeddings().weight[w : w + 1].detach()
    out_rows = model.get_output_embeddings().weight[w : w + 1].detach()
    llm.add_tokens(model, tok, ["glorp"], embeddings=rows, block_output=False, output_embeddings=out_rows)
    marked = [p.replace(f" {args.word} ", " glorp ") for p in paras[args.n : 2 * args.n]]
    texts = [tok(p)["input_ids"][: args.max_len] for p in marked if " glorp " in p]
    print(
        f"new token 'glorp' = copy of {tok.convert_ids_to_tokens(w)!r} (id {w}); {len(ref)} reference and "
        f"{len(held)} held-out paragraphs, {len(texts)} held-out paragraphs with 'glorp'"
    )
    state = llm.get_expansion(model)
    before = llm.verify_no_forgetting(base, model, held)
    print(
        f"no gate, held-out: leak max {before.leak_max:.4f}, p99 {before.leak_p99:.4f}, "
        f"mean {before.leak_mean:.4f}, forgetting {before.forgetting_nats:.5f} nats/token, "
        f"old logits bitwise equal {before.logits_bitwise_equal}"
    )
    print()
    print(
        "| max_leak | statistic | offset | ref. leak before -> after | ref. forgetting before -> after "
        "| held-out leak max | held-out forgetting | glorp loss before -> after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for bound in (float(b) for b in args.bounds.split(",")):
        for stat in args.statistics.split(","):
            with torch.no_grad():
                state.output_layer.leak_offset.fill_(0.0)
            cal = llm.calibrate_leak(model, ref, bound, statistic=stat, texts=texts, progress=False)
            after = llm.verify_no_forgetting(base, model, held)
            assert after.logits_bitwise_equal and after.old_conditional_bitwise_equal
            print(
                f"| {bound:g} | {stat} | {cal.offset:.3f} | {cal.leak_before:.4f} -> {cal.leak_after:.4f} "
                f"| {cal.forgetting_before:.5f} -> {cal.forgetting_after:.5f} | {after.leak_max:.4f} "
                f"| {after.forgetting_nats:.5f} | {cal.new_token_loss_before:.3f} -> {cal.new_token_loss_after:.3f} |"
            )


if __name__ == "__main__":
    main()
