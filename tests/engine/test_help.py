"""--help says what runs (issue 15, item 12): the synthetic default root's real folder name, negated booleans
say that they turn a behaviour off (never "(default: True)"), help texts that state their default get no second
"(default: None)", evaluate.py's default split says how to score the demo's CAMs."""
import argparse
import re

import pytest

from aream_fast.engine.build import synthetic_root
from aream_fast.engine.config import DataConfig, TrainConfig, build_parser
from tests._scripts import load_script


def _parsers():
    from aream_fast.stage2.seg_task import SegTrainConfig

    return {"train.py": build_parser(TrainConfig), "train_seg.py": build_parser(SegTrainConfig, prog="train_seg.py")}


@pytest.mark.parametrize("name", ["train.py", "train_seg.py"])
def test_negated_flags_say_they_turn_something_off(name):
    parser = _parsers()[name]
    negated = [a for a in parser._actions if isinstance(a, argparse._StoreFalseAction)]
    assert negated, "expected --no-... flags"
    for action in negated:
        (flag,) = action.option_strings
        assert flag in action.help and "(default: True)" not in action.help, (flag, action.help)
    text = parser.format_help()
    assert "(default: True)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("name", ["train.py", "train_seg.py"])
def test_no_help_states_two_defaults(name):
    suffix = " (default: %(default)s)"
    for action in _parsers()[name]._actions:
        if action.help and action.help.endswith(suffix):
            assert "default" not in action.help[: -len(suffix)].lower(), (action.dest, action.help)
    device = next(a.help for a in _parsers()[name]._actions if a.dest == "device")
    assert not device.endswith(suffix)  # "(default: cuda if available, else cpu)" only


def test_the_synthetic_default_root_is_named_as_it_is_made():
    help_text = next(a.help for a in build_parser(TrainConfig)._actions if a.dest == "data_root")
    demo = DataConfig()
    pattern = re.search(r"data_cache/synthetic-v\d+-n<train>-<val>-s<size>-seed0", help_text).group(0)
    expected = synthetic_root(demo)
    assert pattern.replace("<train>", str(demo.synthetic_train_size)).replace(
        "<val>", str(demo.synthetic_val_size)).replace("<size>", str(demo.image_size)) == expected
    assert expected in help_text


def test_evaluate_split_help_text(capsys):
    ev = load_script("scripts/evaluate.py", "evaluate_for_help_text")
    with pytest.raises(SystemExit):
        ev._parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default train" in out and "cams_val" in out and "--split val" in out
