"""The shared plumbing: how every CLI ends (a user error, Ctrl-C) and what a tokenizer path may be."""

from pathlib import Path

import pytest

from common import UserError, load_tokenizer, run_cli


def test_a_cli_ends_in_one_line_on_a_user_error_and_on_ctrl_c(capsys, monkeypatch):
    monkeypatch.delenv("DEBUG", raising=False)

    def fails(argv):
        raise UserError("x.json: bad")

    def interrupted(argv):
        raise KeyboardInterrupt

    for main, code, line in ((fails, 1, "error: x.json: bad"), (interrupted, 130, "stopped by Ctrl-C")):
        with pytest.raises(SystemExit) as e:
            run_cli(main, [])
        err = capsys.readouterr().err
        assert e.value.code == code and err.startswith(line) and err.count("\n") == 1, err


def test_one_file_of_a_gpt2_tokenizer_asks_for_its_folder(real_tokenizers, tmp_path):
    vocab = tmp_path / "gpt2-vocab.json"
    vocab.write_bytes((Path(real_tokenizers["gpt2"]) / "vocab.json").read_bytes())
    with pytest.raises(UserError, match="gpt2-vocab.json: one file of a GPT-2-style tokenizer; pass the folder"):
        load_tokenizer(str(vocab))
    assert load_tokenizer(str(real_tokenizers["gpt2"])).get_vocab_size() == 50257
