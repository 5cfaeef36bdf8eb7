"""Time budgets (training/budget.py), stage 1's plateau stop, and balancing rare labels (train.balance:
sampling or loss weights)."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from transformers.optimization import get_cosine_schedule_with_warmup

from productvlm.config import load_config
from productvlm.training.budget import TimeBudget, clocked
from productvlm.training.data import BalancedSampler, label_weights, loss_weights
from productvlm.training.vision_pretrain import RESULT, Plateau
from test_train_run import CONFIGS


class Clock(TimeBudget):
    """A budget whose clock the test sets."""

    def __init__(self, seconds: float, now: float = 0.0):
        super().__init__(seconds)
        self.at = now

    def now(self) -> float:
        return self.at


def cosine(total: int):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return get_cosine_schedule_with_warmup(optimizer, 2, total).lr_lambdas[0]


def test_the_schedule_follows_the_clock_when_it_is_ahead_of_the_steps():
    base, clock = cosine(100), Clock(60.0)
    factor = clocked(base, clock, 100)
    assert factor(10) == base(10)  # no time spent: the steps lead
    clock.at = 30.0  # half the budget after 10 steps: the schedule is halfway
    assert factor(10) == base(50) and factor(70) == base(70)  # whichever is further along
    clock.at = 60.0
    assert factor(10) == base(100) == 0.0  # time is up: annealed to zero


def test_the_budget_stops_training_and_carries_what_was_spent_across_a_resume():
    control = SimpleNamespace(should_training_stop=False)
    budget = Clock(10.0, now=9.0)
    budget.on_step_end(None, None, control)
    assert not control.should_training_stop
    budget.at = 10.0
    budget.on_step_end(None, None, control)
    assert control.should_training_stop

    saved = TimeBudget(10.0, spent=7.5).state()  # what a checkpoint's trainer_state.json keeps
    resumed = TimeBudget(10.0)
    resumed.on_train_begin(None, SimpleNamespace(stateful_callbacks={"TimeBudget": saved}), control)
    assert 7.5 <= resumed.now() < 8.0


def test_stage_one_stops_after_patience_epochs_without_a_better_validation_accuracy():
    curve = iter([0.2, 0.5, 0.6, 0.6, 0.55, 0.6, 0.7])
    plateau = Plateau(lambda: next(curve), patience=3)
    model, control = torch.nn.Linear(1, 1), SimpleNamespace(should_training_stop=False)
    for _ in range(6):
        plateau.on_epoch_end(None, None, control, model=model)
        if control.should_training_stop:
            break
    assert plateau.curve == [0.2, 0.5, 0.6, 0.6, 0.55, 0.6] and plateau.stopped_early  # best at epoch 3
    assert model.training  # measured in eval mode, handed back in train mode


def test_balanced_sampling_draws_rare_labels_as_the_power_says():
    labels = ["common"] * 900 + ["rare"] * 100
    for power, rare_share in ((0.0, 0.1), (0.5, 0.25), (1.0, 0.5)):
        # expected share of "rare": 100 * 100^-p / (100 * 100^-p + 900 * 900^-p)
        expected = 100 ** (1 - power) / (100 ** (1 - power) + 900 ** (1 - power))
        assert expected == pytest.approx(rare_share, abs=0.01)
        draws = Counter(labels[i] for i in BalancedSampler(labels, power, seed=0))
        assert sum(draws.values()) == 1000
        assert abs(draws["rare"] / 1000 - expected) < 4 * math.sqrt(expected * (1 - expected) / 1000)


def test_balanced_order_depends_only_on_seed_and_epoch():
    labels = [str(i % 7) for i in range(200)]
    a, b = BalancedSampler(labels, 0.5, seed=3), BalancedSampler(labels, 0.5, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_balance_with_length_grouping_is_refused_by_name():
    with pytest.raises(Exception, match="train.balance and train.group_by_length"):
        sets = ["train.balance=0.5", "train.balance_by=sampling", "train.group_by_length=true"]
        load_config(CONFIGS / "tiny-cpu.yaml", sets)
    with pytest.raises(Exception, match="train.balance weighs single rows and train.packing"):
        load_config(
            CONFIGS / "tiny-cpu.yaml", ["train.balance=0.5", "train.balance_by=loss", "train.packing=true"]
        )
    # loss weights leave the order to the length grouping
    sets = ["train.balance=0.5", "train.balance_by=loss", "train.group_by_length=true"]
    assert load_config(CONFIGS / "tiny-cpu.yaml", sets).train.balance_by == "loss"


def test_loss_weights_have_mean_one_and_the_power_says_how_much_rarer_weighs_more():
    labels = ["common"] * 900 + ["rare"] * 100
    for power in (0.0, 0.5, 1.0):
        w = label_weights(labels, power)
        assert float(w.mean()) == pytest.approx(1.0)
        assert float(w[-1] / w[0]) == pytest.approx(9.0**power)  # 900 / 100 rows
    rows = [{"category3_code": c, "product_code": i} for i, c in enumerate(labels)]
    t = load_config(CONFIGS / "tiny-cpu.yaml", ["train.balance=1", "train.balance_by=loss"]).train
    weights = loss_weights(t, rows, "cat/train")
    assert sum(w for w, r in zip(weights, rows) if r["category3_code"] == "rare") == pytest.approx(500.0)
    with pytest.raises(Exception, match=r"row \? \(product_code 7\) of cat/train has no such column"):
        loss_weights(t, [*rows[:7], {"product_code": 7}], "cat/train")
    sampling = load_config(CONFIGS / "tiny-cpu.yaml", ["train.balance=1", "train.balance_by=sampling"]).train
    assert loss_weights(sampling, rows, "cat/train") is None  # sampling draws; the loss stays plain


def test_stage_one_on_a_budget_stops_on_time_and_says_so(tmp_path):
    from productvlm.data.synth import synthesize
    from productvlm.training.run import train

    data = tmp_path / "catalog"
    synthesize(data, rows=64, seed=5, overwrite=True, progress=False, workers=1)
    cfg = load_config(
        CONFIGS / "tiny-cpu.yaml",
        [
            f"data.dir={data}",
            f"output_dir={tmp_path / 'run'}",
            "tracking.backend=none",
            "eval.subset=0",
            "train.batch_size=8",
            "train.max_steps=1",
            "train.num_workers=0",
            "train.vision_pretrain.epochs=1000",
            "train.vision_pretrain.max_minutes=0.05",  # 3 s: far fewer than 1000 epochs
            "train.vision_pretrain.patience=null",  # only the clock stops it
        ],
    )
    train(cfg, progress=False)
    result = json.loads((tmp_path / "run" / "vision-pretrained" / RESULT).read_text())
    assert result["stopped_by"] == "time" and 0 < result["epochs_run"] < 1000
    assert len(result["validation_curve"]) == math.ceil(result["epochs_run"])  # a cut epoch is measured too


def test_the_end_of_train_puts_stage_one_beside_the_trained_model(tmp_path, capsys):
    from productvlm.data.synth import synthesize
    from productvlm.prompting.confidence import load_calibration
    from productvlm.training.run import train

    data, run = tmp_path / "catalog", tmp_path / "run"
    synthesize(data, rows=64, seed=5, overwrite=True, progress=False, workers=1)
    sets = [f"data.dir={data}", f"output_dir={run}", "tracking.backend=none", "eval.subset=4"]
    sets += [
        "train.batch_size=8",
        "train.max_steps=2",
        "train.num_workers=0",
        "train.vision_pretrain.epochs=1",
    ]
    train(load_config(CONFIGS / "tiny-cpu.yaml", sets), progress=False)
    last = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    stage1 = json.loads((run / "vision-pretrained" / RESULT).read_text())
    calibration = load_calibration(run / "final")
    assert last["stage1_tower_validation_accuracy"] == stage1["validation_accuracy"]
    assert last["final_validation_category_accuracy"] == calibration.curves["category"][-1][1]
    out = capsys.readouterr().out
    assert f"({calibration.rows} photos)" in out and "still learning" not in out
    # a tower cut short while it still climbed: the end of the run says to give stage 1 more time
    from productvlm.training.run import compare_stages

    (run / "vision-pretrained" / RESULT).write_text(json.dumps({**stage1, "still_climbing": 0.046}))
    compare_stages(run, str(run / "vision-pretrained"), run / "final", 2)
    assert "still learning when stage 1 ended (+4.6 points over its last 3 epochs)" in capsys.readouterr().out
