"""The model subcommands of the markovmem command on a tiny saved model:
distill -> fit -> expand, and add-tokens (learn + save an expansion + merged export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import markovmem as mm
from markovmem import llm
from markovmem.cli import main
from markovmem.llm.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path):
    torch.set_num_threads(1)
    path = tmp_path / "tiny"
    tiny_model("llama", vocab_size=48, hidden_size=32).save_pretrained(path)
    tiny_tokenizer(48).save_pretrained(path)
    return path


def test_distill_fit_expand(model_dir, tmp_path, capsys) -> None:
    matrix = tmp_path / "P.safetensors"
    assert main(["distill", str(model_dir), "-o", str(matrix), "--top-k", "8", "--quiet"]) == 0
    P = mm.TransitionMatrix.load(matrix, verify=True)
    assert (P.n_states, P.nnz) == (48, 48 * 8) and llm.dictionary_info(P)["top_k"] == 8
    assert llm.dictionary_info(P)["mode"] == "token"
    counts = sp.csr_array(np.random.default_rng(0).integers(0, 5, size=(2, 48)).astype(float))
    sp.save_npz(tmp_path / "counts.npz", counts)
    fitted = tmp_path / "fit.npz"
    assert main(["fit", str(matrix), str(tmp_path / "counts.npz"), "-o", str(fitted), "--s", "4"]) == 0
    with np.load(fitted) as z:
        assert z["kl"].shape == (2,) and tuple(z["alpha_shape"]) == (2, 48)
    expanded = tmp_path / "Q.safetensors"
    capsys.readouterr()
    assert main(["expand", str(matrix), str(fitted), "-o", str(expanded), "--json"]) == 0
    cert = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert cert["ok"] and cert["n_new"] == 2
    assert mm.verify_expansion(P, mm.TransitionMatrix.load(expanded)).ok


def test_add_tokens_writes_an_expansion_that_reloads(model_dir, tmp_path, capsys) -> None:
    rng = np.random.default_rng(1)
    text = tmp_path / "train.txt"
    text.write_text(
        "\n\n".join(" ".join(["w5", "glorp"] + [f"w{int(i)}" for i in rng.integers(3, 48, 6)]) for _ in range(24))
    )
    out = tmp_path / "glorp.safetensors"
    merged = tmp_path / "merged"
    code = main(
        [
            "add-tokens",
            str(model_dir),
            "--tokens",
            "glorp",
            "--text",
            str(text),
            "-o",
            str(out),
            "--s",
            "2",
            "--tune-steps",
            "2",
            "--merged",
            str(merged),
            "--quiet",
        ]
    )
    assert code == 0
    printed, err = capsys.readouterr()
    assert "glorp" in printed and "ids [48]" in printed
    assert "dictionary: corpus mode" in printed and "24 contexts" in printed and "held-out gain" in printed
    assert "Loading weights" not in err and "it/s" not in err  # --quiet: no bar, transformers' included
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert llm.load_expansion(base, tok, out) == [48]
    assert AutoModelForCausalLM.from_pretrained(merged).get_input_embeddings().weight.shape[0] == 49


def test_distill_corpus_mode_records_how_rows_were_made(model_dir, tmp_path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("w5 w6 w7 w5\n\nw6 w5 w9")
    matrix = tmp_path / "P.safetensors"
    assert (
        main(
            [
                "distill",
                str(model_dir),
                "-o",
                str(matrix),
                "--top-k",
                "8",
                "--corpus",
                str(text),
                "--fallback",
                "unigram",
                "--shrinkage",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    info = llm.dictionary_info(mm.TransitionMatrix.load(matrix, verify=True))
    assert info["mode"] == "corpus" and info["fallback"] == "unigram" and info["shrinkage"] == 2.0
    assert info["rows_seen"] >= 3 and len(info["corpus"]) == 32


def test_model_commands_report_a_missing_directory(tmp_path, capsys) -> None:
    assert main(["distill", str(tmp_path / "nope"), "-o", str(tmp_path / "P.safetensors")]) == 2
    assert "error" in capsys.readouterr().err


def test_add_tokens_generate_gates_the_leak_and_exports(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(2)
    text = tmp_path / "train.txt"
    text.write_text(
        "\n\n".join(" ".join(["w5", "glorp"] + [f"w{int(i)}" for i in rng.integers(3, 48, 6)]) for _ in range(24))
    )
    out, merged = tmp_path / "glorp.safetensors", tmp_path / "merged"
    args = ["add-tokens", str(model_dir), "--tokens", "glorp", "--text", str(text), "-o", str(out), "--quiet"]
    code = main([*args, "--tune-steps", "2", "--generate", "--max-leak", "0.05", "--merged", str(merged)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "output row of glorp = " in printed and "offset on new logits" in printed
    assert "leak mean / p99 / max" in printed and "(bound on max: 0.05)" in printed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert llm.load_expansion(base, tok, out) == [48]
    state = llm.get_expansion(base)
    assert not state.config.block_output and float(state.output_layer.leak_offset) <= 0.0
    exported = AutoModelForCausalLM.from_pretrained(merged)
    assert exported.get_output_embeddings().weight.shape[0] == 49  # the new token has an output row
    assert main([*args, "--max-leak", "0.05"]) != 0
    assert "--max-leak bounds the leak of generated tokens; add --generate" in capsys.readouterr().err
