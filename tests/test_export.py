"""`fedtt export` and `fedtt predict`: an exported model predicts what the run's final
evaluation measured, merged LoRA is a plain Hugging Face model, TT adapters refuse to merge."""

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny
from transformers import AutoModelForSequenceClassification

from fedtt.cli import main
from fedtt.export import export_run, load_exported
from fedtt.federated.inprocess import run_inprocess
from fedtt.federated.runtime import split_rows


def finished_run(tmp_path, method, **sets):
    cfg = tiny(tmp_path, method, **{"method.name": method, "federation.rounds": 2, **sets})
    summary = run_inprocess(cfg, quiet=True)
    test = split_rows(cfg)[2]
    return cfg, summary, list(test["text"]), list(test["label"])


def accuracy(predictor, texts, labels):
    probs = predictor.scores(texts)
    assert torch.allclose(probs.sum(-1), torch.ones(len(texts)))
    return float((probs.argmax(-1) == torch.tensor(labels)).float().mean())


@pytest.mark.parametrize("method, merge", [("fedtt", False), ("fedtt+", False),
                                           ("lora", False), ("lora", True),
                                           ("ffa-lora", True)])
def test_exported_model_predicts_what_the_run_evaluated(tmp_path, method, merge):
    cfg, summary, texts, labels = finished_run(tmp_path, method)
    out = export_run(cfg.output.dir, tmp_path / "export", merge=merge)
    predictor = load_exported(out)
    assert predictor.label_names == json.loads(
        (Path(cfg.output.dir) / "label_counts.json").read_text())["label_names"]
    assert accuracy(predictor, texts, labels) == pytest.approx(summary["final_accuracy"],
                                                               abs=1e-6)
    if merge:  # an ordinary Hugging Face directory: no peft, no fedtt needed to load it
        plain = AutoModelForSequenceClassification.from_pretrained(out)
        assert not any("lora" in n for n, _ in plain.named_parameters())
        assert plain.config.id2label[0] == predictor.label_names[0]


def test_export_keeps_frozen_adapter_tensors(tmp_path):
    cfg, _, _, _ = finished_run(tmp_path, "ffa-lora")
    from safetensors.torch import load_file

    saved = load_file(str(export_run(cfg.output.dir, tmp_path / "e") / "adapters.safetensors"))
    assert any("lora_A" in n for n in saved) and any("lora_B" in n for n in saved)


def test_tt_adapters_refuse_to_merge_and_say_why(tmp_path, capsys):
    cfg, _, _, _ = finished_run(tmp_path, "fedtt")
    assert main(["export", cfg.output.dir, "--out", str(tmp_path / "m"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "cannot be merged" in err and "bottleneck" in err
    assert not (tmp_path / "m").exists()  # refused before anything is written


@pytest.mark.parametrize("name, content", [
    ("in.csv", 'text\nNA\nNone\n007\n1.50\n""\n'),
    ("in.jsonl", "\n".join(json.dumps({"text": t}) for t in
                            ["NA", "None", "007", "1.50", ""]) + "\n"),
])
def test_read_texts_keeps_each_text_as_written(tmp_path, name, content):
    from fedtt.cli import read_texts

    (tmp_path / name).write_text(content)
    assert read_texts(tmp_path / name, "text") == ["NA", "None", "007", "1.50", ""]


def test_keep_local_head_has_no_global_model(tmp_path):
    cfg, _, _, _ = finished_run(tmp_path, "fedtt", **{"adapter.head": "keep-local"})
    with pytest.raises(ValueError, match="keep-local"):
        export_run(cfg.output.dir, tmp_path / "e")


def test_predict_cli_on_texts_and_files(tmp_path, capsys):
    cfg, _, texts, _ = finished_run(tmp_path, "fedtt")
    out = tmp_path / "export"
    assert main(["export", cfg.output.dir, "--out", str(out)]) == 0
    capsys.readouterr()
    labels = load_exported(out).predict(texts[:3])
    assert main(["predict", str(out), *texts[:2]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [lab for lab, _ in labels[:2]]
    (tmp_path / "in.txt").write_text("\n".join(texts[:3]) + "\n")
    (tmp_path / "in.csv").write_text("review\n" + "\n".join(texts[:3]) + "\n")
    assert main(["predict", str(out), "--file", str(tmp_path / "in.txt"), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == [lab for lab, _ in labels]
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in rows)
    assert main(["predict", str(out), "--file", str(tmp_path / "in.csv"),
                 "--text-column", "review"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["predict", str(out), "--file", str(tmp_path / "in.csv")]) == 2
    assert "no column 'text'" in capsys.readouterr().err
    assert main(["predict", str(tmp_path)]) == 2
