"""The sequential-mastery protocol of the reference code (Davidson & Mozer, CVPR 2020), point by
point: epoch composition, curricula, simultaneous epochs, the forgetting experiment, the
task-conditional model, the whole-run epoch budget, the reference's test bugs as legacy
switches, finer-grained trials to criterion, the main job's printed table, and that a CPU run tunes
the allocator (tests/test_core.py tests the allocator itself).

As in test_mastery.py, no test depends on when a real model passes a criterion: criterion logic
is driven by scripted accuracies, and real runs are checked for invariants or for exact
equality between two runs on the same CPU."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from metacl.cli import main
from metacl.core import allocator
from metacl.core.config import read_yaml
from metacl.core.errors import ConfigError, RunInterrupted
from metacl.core.experiment import load_experiment_config
from metacl.core.run import Run
from metacl.mastery import data as scene_data
from metacl.mastery import experiment as mastery
from metacl.mastery.config import ForgettingConfig, ModelConfig
from metacl.mastery.epochs import draw_all_pairs, episode_counts
from metacl.mastery.report import write_report
from metacl.models import build_model
from tests.mastery_helpers import CONFIGS, scripted_evaluate, tiny
from tests.mastery_helpers import run_config as run_mastery_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(path, overrides, mode="new"):
    """test_mastery's run_config, plus the `tests` table (train.test_every_trials)."""
    run_dir, final, tables = run_mastery_config(path, overrides, mode)
    if (run_dir / "tests.parquet").exists():
        tables["tests"] = pd.read_parquet(run_dir / "tests.parquet")
    return run_dir, final, tables


def spy_training(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record the (images, task ids) of every train_trials call."""
    calls, original = [], mastery.train_trials

    def spy(model, optimizer, data, images, task_ids, *args, **kwargs):
        calls.append((images.clone(), task_ids.clone()))
        return original(model, optimizer, data, images, task_ids, *args, **kwargs)

    monkeypatch.setattr(mastery, "train_trials", spy)
    return calls


# ------------------------------------------------------------------ episode 1 and the curricula
def test_episode_one_is_the_new_task_share_redrawn_every_epoch(scenes, tmp_path, monkeypatch):
    """Episode 1 trains new_task_share * epoch_size trials (22,500 of 45,000 at paper size; 180
    of 360 here) drawn at random from the training images and redrawn every epoch."""
    assert episode_counts(45_000, 0, 1, 0.5) == [22_500]
    assert episode_counts(45_000, 0, 1, 0.5, "ratio") == [22_500]
    calls = spy_training(monkeypatch)
    monkeypatch.setattr(mastery, "evaluate", scripted_evaluate([[0.5], [0.6], [0.9]]))
    _, final, tables = run_config(None, tiny(scenes, tmp_path, "tasks.num_tasks=1", "train.criterion=0.75"))
    assert len(calls) == 3
    draws = [set(images.tolist()) for images, _ in calls]
    assert all(len(d) == 180 and max(d) < 360 for d in draws)  # distinct training images
    assert draws[0] != draws[1] != draws[2]  # redrawn every epoch
    criterion = tables["criterion"]
    assert criterion["trials_per_epoch"].tolist() == [180]
    assert criterion["trials_to_criterion"].tolist() == [3 * 180]  # counted in 180s
    assert final["new_task_trials"] == [540]
    # it scales with the epoch: epoch_size=200 gives 100 trials
    monkeypatch.setattr(mastery, "evaluate", scripted_evaluate([[0.9]]))
    run_config(
        None, tiny(scenes, tmp_path, "tasks.num_tasks=1", "train.criterion=0.75", "train.epoch_size=200", "name=small")
    )
    assert calls[-1][0].numel() == 100


def test_power_curriculum_shares_the_whole_epoch_with_the_new_task():
    """w_t = (E - t + 1)^(-alpha) for every task t = 1..E (the new task t = E has weight 1),
    normalised, times the whole 45,000-trial epoch."""
    new = [episode_counts(45_000, e - 1, e, 0.5, "power", 1.25, 1.14)[0] for e in range(1, 11)]
    assert new[0] == 45_000
    assert new[1] == round(45_000 / (1 + 2**-1.14)) == 30_954
    assert new[2] == 25_868 and new[9] == 17_367
    assert new == sorted(new, reverse=True)
    for episode in range(1, 11):
        counts = episode_counts(45_000, episode - 1, episode, 0.5, "power", 1.25, 1.14)
        weights = [(episode - t + 1) ** -1.14 for t in range(1, episode + 1)]  # t = position
        exact = [45_000 * w / sum(weights) for w in weights]
        assert sum(counts) == 45_000
        assert all(abs(c - x) < 1 for c, x in zip(counts, [exact[-1], *exact[:-1]]))
    # new_task_share plays no part in it; the ratio curriculum keeps the new task at 22,500
    assert episode_counts(45_000, 3, 4, 0.3, "power") == episode_counts(45_000, 3, 4, 0.5, "power")
    ratio = [episode_counts(45_000, e - 1, e, 0.5, "ratio")[0] for e in range(1, 11)]
    assert ratio == [22_500] * 10


# ------------------------------------------------------------------ simultaneous
def test_simultaneous_epoch_presents_every_image_query_pair_once(scenes, tmp_path, monkeypatch):
    calls = spy_training(monkeypatch)
    _, _, tables = run_config(
        CONFIGS / "quick" / "simultaneous.yaml", tiny(scenes, tmp_path, "train.max_epochs_per_episode=1")
    )
    images, task_ids = calls[0]
    assert images.numel() == 360 * 10  # 450,000 at paper size (45,000 x 10 queries)
    pairs = set(zip(images.tolist(), task_ids.tolist()))
    assert pairs == {(i, t) for i in range(360) for t in range(10)}
    assert not torch.equal(images[:360], torch.arange(360))  # shuffled together
    assert tables["criterion"]["trials_per_epoch"].eq(360).all()
    assert tables["epochs"]["cumulative_trials"].max() == 3600
    # train.epoch_size: that many random training images per query, each pair at most once
    generator = torch.Generator().manual_seed(0)
    images, task_ids = draw_all_pairs(360, [3, 4], 100, generator)
    for task in (3, 4):
        mine = images[task_ids == task]
        assert mine.numel() == mine.unique().numel() == 100
    with pytest.raises(ConfigError, match="epoch_size"):
        draw_all_pairs(360, [3], 400, generator)


# ------------------------------------------------------------------ forgetting
FORGETTING_SCRIPT = [
    [0.9],
    [0.9, 0.9],  # baseline episodes 1 and 2 (a; b, a)
    [0.5, 0.9],
    [0.6, 0.8],
    [0.9, 0.7],  # after 1 (b; a): pre-test, passes at 2
    [0.5, 0.9, 0.9],
    [0.6, 0.8, 0.8],
    [0.7, 0.7, 0.7],
    [0.7, 0.6, 0.6],
]  # after 2: cap of 3


def test_forgetting_runs_every_new_task_from_the_baselines_weights(scenes, tmp_path, monkeypatch):
    """All forgetting tasks in one run, each from the baseline's episode-E weights (weights
    only: a fresh Adam for the first, carried on to the next), sub-epochs slicing a permutation
    of the training images, and a sub-epoch 0 test before the first sub-epoch."""
    calls = spy_training(monkeypatch)
    starts, original = [], mastery.Mastery.start_forgetting_task

    def start(self, after, tasks):
        original(self, after, tasks)
        baseline = torch.load(self.run.checkpoint_path(f"episode-{after}"), weights_only=True)
        same = all(torch.equal(v, baseline["model"][k]) for k, v in self.model.state_dict().items())
        steps = [int(s["step"]) for s in self.optimizer.state.values()]
        starts.append((after, same, steps))

    monkeypatch.setattr(mastery.Mastery, "start_forgetting_task", start)
    monkeypatch.setattr(mastery, "evaluate", scripted_evaluate(FORGETTING_SCRIPT))
    run_dir, final, tables = run_config(
        CONFIGS / "quick" / "forgetting.yaml",
        tiny(
            scenes,
            tmp_path,
            "train.criterion=0.75",
            "forgetting.after_episodes=[2, 1]",
            "forgetting.subepoch_trials=150",
            "forgetting.max_subepochs=3",
        ),
    )
    order = final["order"]
    assert final["episodes"] == 2 and final["forgetting_after"] == [1, 2]
    assert final["forgetting_subepochs"] == [2, 3]
    # weights from the baseline's checkpoint; a fresh Adam, then carried (2 sub-epochs x 3 steps)
    assert starts == [(1, True, []), (2, True, [6] * len(starts[1][2]))] and starts[1][2]
    forgetting = tables["forgetting"]
    assert forgetting.groupby("after_episode")["subepoch"].apply(list).to_dict() == {
        1: [0, 0, 1, 1, 2, 2],
        2: [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3],
    }
    pre = forgetting[forgetting["subepoch"] == 0]
    assert pre["trials"].eq(0).all() and pre["test_acc"].tolist() == [0.5, 0.9, 0.5, 0.9, 0.9]
    second = forgetting[forgetting["after_episode"] == 2]
    assert second["task"].tolist()[:3] == [order[2], order[0], order[1]]
    assert second["times_trained"].tolist()[:3] == [0, 2, 1]
    assert second["trials"].max() == 450
    # sub-epochs: the new task alone, consecutive slices of a permutation, a new one when spent
    forgetting_calls = calls[2:]  # after the baseline's 2 epochs
    assert [c[0].numel() for c in forgetting_calls] == [150] * 5
    assert set(forgetting_calls[0][1].tolist()) == {order[1]}
    assert set(forgetting_calls[2][1].tolist()) == {order[2]}
    stream = torch.cat([c[0] for c in forgetting_calls[2:]])  # after episode 2
    assert sorted(stream[:360].tolist()) == list(range(360))
    assert stream[360:].unique().numel() == 90
    assert not (run_dir / "checkpoints" / "episode-3.pt").exists()  # baseline to max(after)


def test_forgetting_defaults_follow_the_reference():
    spec = ForgettingConfig()
    assert spec.after_episodes == [] and spec.max_subepochs == 1000
    assert spec.subepoch_trials == 1500 and spec.carry_optimizer
    paper = load_experiment_config(CONFIGS / "forgetting.yaml")
    assert paper.forgetting.after_episodes == list(range(1, 10))
    assert paper.forgetting.max_subepochs == 1000 and paper.forgetting.subepoch_trials == 1500
    quick = read_yaml(CONFIGS / "quick" / "forgetting.yaml")
    assert quick["forgetting"]["after_episodes"] == [1, 2, 3, 4]  # quick has 5 tasks


def test_forgetting_with_fresh_optimizers(scenes, tmp_path, monkeypatch):
    steps, original = [], mastery.Mastery.start_forgetting_task

    def start(self, after, tasks):
        original(self, after, tasks)
        steps.append(len(self.optimizer.state))

    monkeypatch.setattr(mastery.Mastery, "start_forgetting_task", start)
    monkeypatch.setattr(mastery, "evaluate", scripted_evaluate(FORGETTING_SCRIPT))
    run_config(
        None,
        tiny(
            scenes,
            tmp_path,
            "train.criterion=0.75",
            "forgetting.after_episodes=[1, 2]",
            "forgetting.subepoch_trials=150",
            "forgetting.max_subepochs=3",
            "forgetting.carry_optimizer=false",
        ),
    )
    assert steps == [0, 0]


def test_forgetting_from_a_source_run_matches_forgetting_in_the_run(scenes, tmp_path):
    """The same seed gives the same forgetting tables whether the baseline ran in this run or
    in a source run (each forgetting task draws from its own stream)."""
    common = [
        "train.criterion=0.75",
        "train.max_epochs_per_episode=2",
        "forgetting.subepoch_trials=90",
        "forgetting.max_subepochs=2",
    ]
    source, _, _ = run_config(None, tiny(scenes, tmp_path, *common, "name=baseline"))
    _, _, inside = run_config(None, tiny(scenes, tmp_path, *common, "name=inside", "forgetting.after_episodes=[1, 2]"))
    _, final, outside = run_config(
        None,
        tiny(
            scenes,
            tmp_path,
            *common,
            "name=outside",
            "forgetting.after_episodes=[1, 2]",
            f"forgetting.source_run={source}",
        ),
    )
    assert "epochs" not in outside and final["forgetting_after"] == [1, 2]
    pd.testing.assert_frame_equal(inside["forgetting"], outside["forgetting"])


def test_forgetting_resumes_exactly(scenes, tmp_path, monkeypatch):
    overrides = tiny(
        scenes,
        tmp_path,
        "train.criterion=0.99",
        "train.max_epochs_per_episode=2",
        "forgetting.after_episodes=[1, 2]",
        "forgetting.subepoch_trials=150",
        "forgetting.max_subepochs=3",
        "model.dropout=true",
    )
    straight, final, tables = run_config(None, overrides + ["name=straight"])
    original, saved = Run.save_checkpoint, []

    def stop_in_forgetting(self, state, name="last"):
        path = original(self, state, name)
        saved.append(state["phase"])
        if saved.count("forgetting") == 4:  # inside the forgetting phase, whatever passes
            self.stop_requested = True
        return path

    monkeypatch.setattr(Run, "save_checkpoint", stop_in_forgetting)
    with pytest.raises(RunInterrupted):
        run_config(None, overrides + ["name=resumed"])
    monkeypatch.setattr(Run, "save_checkpoint", original)
    resumed, final2, tables2 = run_config(None, overrides + ["name=resumed"], mode="resume")
    assert final2 == final
    for name in tables:
        pd.testing.assert_frame_equal(tables[name], tables2[name])
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_forgetting_config_errors(scenes, tmp_path):
    with pytest.raises(ConfigError, match="twice"):
        run_config(None, tiny(scenes, tmp_path, "forgetting.after_episodes=[1, 1]"))
    with pytest.raises(ConfigError, match="after_episodes"):
        run_config(None, tiny(scenes, tmp_path, "forgetting.after_episodes=[0]", "name=b"))
    with pytest.raises(ConfigError, match="sequential or heterogeneous"):
        run_config(
            CONFIGS / "quick" / "simultaneous.yaml", tiny(scenes, tmp_path, "forgetting.after_episodes=[1]", "name=c")
        )


# ------------------------------------------------------------------ task-conditional model
def test_task_conditional_gate_and_shift_have_biases_and_both_is_the_default():
    assert ModelConfig().conditioning == "both"
    assert load_experiment_config(CONFIGS / "task-conditional.yaml").model.conditioning == "both"
    model = build_model({"name": "task-conditional", "channels": [4, 8], "hidden": [16], "image_size": [16, 16]})
    assert model.conditioning == "both" and model.gates is not None and model.shifts is not None
    names = dict(model.named_parameters())
    for layer, channels in enumerate([3, 4]):
        assert names[f"gates.{layer}.bias"].shape == (channels,)
        assert names[f"shifts.{layer}.bias"].shape == (channels,)
    # the biases act: with a zero query, the gate is sigmoid(b_m) and the shift b_a
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        before = model.conv_features(x, torch.zeros(2, 30))
        model.shifts[0].bias.add_(1.0)
        assert not torch.equal(before, model.conv_features(x, torch.zeros(2, 30)))


# ------------------------------------------------------------------ whole-run epoch budget
def test_max_total_epochs_ends_the_run_where_it_stands(scenes, tmp_path, monkeypatch):
    monkeypatch.setattr(mastery, "evaluate", scripted_evaluate([[0.5], [0.8], [0.6, 0.9]]))
    run_dir, final, tables = run_config(
        None,
        tiny(scenes, tmp_path, "train.criterion=0.75", "train.max_epochs_per_episode=null", "train.max_total_epochs=3"),
    )
    criterion = tables["criterion"]
    assert final["epochs"] == 3 and final["episodes"] == 1 and final["budget_exhausted"]
    assert tables["epochs"]["epoch"].max() == 3
    assert criterion["episode"].tolist() == [1, 2, 2]  # the cut episode is kept
    assert criterion["episode_passed"].tolist() == [True, False, False]
    assert criterion["reached"].tolist() == [True, False, True]
    assert criterion["episode_epochs"].tolist() == [2, 1, 1]
    # resuming the finished run changes nothing
    _, again, _ = run_config(
        None,
        tiny(scenes, tmp_path, "train.criterion=0.75", "train.max_epochs_per_episode=null", "train.max_total_epochs=3"),
        mode="resume",
    )
    assert again == final
    # a budget that ends the baseline early leaves out the forgetting tasks it did not reach
    monkeypatch.setattr(mastery, "evaluate", scripted_evaluate([[0.5], [0.8], [0.5, 0.9], [0.9, 0.8]]))
    _, final, tables = run_config(
        None,
        tiny(
            scenes,
            tmp_path,
            "train.criterion=0.75",
            "train.max_total_epochs=2",
            "name=forget",
            "forgetting.after_episodes=[1, 2]",
        ),
    )
    assert final["forgetting_after"] == [1] and final["forgetting_subepochs"] == [1]
    with pytest.raises(ConfigError, match="both null"):
        run_config(None, tiny(scenes, tmp_path, "train.max_epochs_per_episode=null", "name=x"))


# ------------------------------------------------------------------ legacy test switches
def evaluation_trace(data, model, **options) -> tuple[list[int], set[bool], set[bool]]:
    """Rows that `evaluate` reads, and the modes BatchNorm and dropout run in."""
    rows, norm_modes, dropout_modes = [], set(), set()
    original = data.batch

    def batch(index):
        rows.extend(index.tolist())
        return original(index)

    data.batch = batch
    hooks = [
        m.register_forward_pre_hook(lambda m, _: norm_modes.add(m.training))
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    hooks += [
        m.register_forward_pre_hook(lambda m, _: dropout_modes.add(m.training))
        for m in model.modules()
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))
    ]
    try:
        mastery.evaluate(model, data, [0, 1], 25, **options)
    finally:
        del data.batch
        for hook in hooks:
            hook.remove()
    return rows, norm_modes, dropout_modes


def test_legacy_switches_change_which_images_and_which_mode_testing_uses(scenes):
    data = scene_data.load(scenes, 0.1, torch.device("cpu"))
    model = build_model(
        {"name": "cnn-mlp", "channels": [4, 8], "hidden": [16], "image_size": [16, 16], "dropout": True}
    ).train()
    rows, norm, dropout = evaluation_trace(data, model)
    assert sorted(rows) == list(range(360, 400)) and norm == {False} and dropout == {False}
    rows, norm, dropout = evaluation_trace(data, model, on_train_images=True)
    assert sorted(rows) == list(range(0, 40)) and norm == {False}  # first num_test train rows
    rows, norm, dropout = evaluation_trace(data, model, batchnorm_train=True)
    assert sorted(rows) == list(range(360, 400)) and norm == {True} and dropout == {False}
    assert model.training  # restored afterwards


def test_legacy_switches_reach_the_test_pass(scenes, tmp_path, monkeypatch):
    seen = []

    def evaluate(model, data, tasks, batch_size, **options):
        seen.append(options)
        return {"acc": [0.99] * len(tasks), "loss": [0.0] * len(tasks)}

    monkeypatch.setattr(mastery, "evaluate", evaluate)
    run_config(None, tiny(scenes, tmp_path, "tasks.num_tasks=1"))
    run_config(
        None,
        tiny(
            scenes,
            tmp_path,
            "tasks.num_tasks=1",
            "name=legacy",
            "train.legacy_test_on_train_images=true",
            "train.legacy_batchnorm_train_at_test=true",
        ),
    )
    assert seen == [
        {"on_train_images": False, "batchnorm_train": False},
        {"on_train_images": True, "batchnorm_train": True},
    ]


# ------------------------------------------------------------------ finer-grained criterion
def test_test_every_trials_records_the_first_passing_test_point(scenes, tmp_path, monkeypatch):
    """Criterion 0.75, tests every 120 trials (batches of 60): episode 1 (180 trials an epoch)
    tests at 120 and at the epoch end; episodes 2-3 (360) at 120, 240 and the end. Episodes end
    only at epoch ends."""
    monkeypatch.setattr(
        mastery,
        "evaluate",
        scripted_evaluate(
            [
                [0.8],
                [0.6],
                [0.7],
                [0.8],  # ep 1: a passes at 120 trials
                [0.5, 0.9],
                [0.8, 0.7],
                [0.7, 0.9],  # ep 2 (b, a), epoch 1
                [0.6, 0.6],
                [0.6, 0.6],
                [0.9, 0.9],  # ep 2, epoch 2: passes
                [0.9] * 3,
                [0.9] * 3,
                [0.9] * 3,
            ]
        ),
    )  # ep 3: passes at epoch 1
    run_dir, final, tables = run_config(
        None,
        tiny(
            scenes, tmp_path, "train.criterion=0.75", "train.test_every_trials=120", "train.max_epochs_per_episode=20"
        ),
    )
    criterion, tests = tables["criterion"], tables["tests"]
    assert criterion.groupby("episode")["episode_epochs"].first().tolist() == [2, 2, 1]
    first = criterion.iloc[0]
    assert (first.epochs_to_criterion, first.trials_to_criterion) == (1, 120)
    assert final["new_task_trials"][0] == 120
    assert tests["trials_in_epoch"].tolist()[:4] == [120, 180, 120, 180]
    assert len(tests) == 4 * 1 + 6 * 2 + 3 * 3
    for row in criterion.itertuples():  # trials to criterion = the first passing test point
        mine = tests[(tests["episode"] == row.episode) & (tests["task"] == row.task)]
        passing = mine[mine["test_acc"] > 0.75].iloc[0]
        assert row.trials_to_criterion == passing.task_trials
        assert row.epochs_to_criterion == passing.epoch_in_episode
    for (_, epoch, _), point in tests.groupby(["episode", "epoch_in_episode", "trials_in_epoch"]):
        per_epoch = 180 if point["episode"].iloc[0] == 1 else 360
        in_epoch = point["trials_in_epoch"].iloc[0]
        assert point["task_trials"].sum() == (epoch - 1) * per_epoch + in_epoch
    # the report carries the finer test points and plots them
    report = write_report([run_dir], tmp_path / "report")
    written = pd.read_csv(report / "tests.csv")
    assert len(written) == len(tests) and (written["test_acc"].to_numpy() == tests["test_acc"].to_numpy()).all()
    assert (report / "accuracy_curves.png").stat().st_size > 0 and "- tests.csv" in (report / "summary.md").read_text()


def test_test_every_trials_does_not_change_training(scenes, tmp_path):
    common = ["train.criterion=0.75", "train.max_epochs_per_episode=2"]
    plain, _, a = run_config(None, tiny(scenes, tmp_path, *common, "name=plain"))
    fine, _, b = run_config(None, tiny(scenes, tmp_path, *common, "name=fine", "train.test_every_trials=50"))
    assert "tests" not in a and len(b["tests"]) > len(b["epochs"])
    pd.testing.assert_frame_equal(a["epochs"], b["epochs"])
    x = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["model"]
    y = torch.load(fine / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------ the main job's output
def test_mastery_run_prints_its_trials_to_criterion_table(scenes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        mastery, "evaluate", scripted_evaluate([[0.5], [0.8], [0.9, 0.9], [0.6, 0.9, 0.9], [0.9, 0.9, 0.9]])
    )
    overrides = tiny(scenes, tmp_path, "train.criterion=0.75", "train.max_epochs_per_episode=20")
    assert main(["mastery", "run", str(CONFIGS / "quick.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    config = load_experiment_config(CONFIGS / "quick.yaml", overrides)
    run_dir = tmp_path / config.name
    order = pd.read_parquet(run_dir / "criterion.parquet").query("is_new")["task"].tolist()
    assert f"run complete: {run_dir}" in out
    assert "Trials to criterion (test accuracy > 0.75" in out
    lines = [line.split() for line in out.splitlines()]
    rows = [line for line in lines if line[:1] in (["1"], ["2"], ["3"])]
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        ("1", f"({order[0]})", "2", "360"),
        ("2", f"({order[1]})", "1", "180"),
        ("3", f"({order[2]})", "2", "360"),
    ]
    assert f"Run directory: {run_dir}" in out
    assert f"metacl mastery report {run_dir} --out" in out


def test_mastery_run_prints_its_forgetting_tasks(scenes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mastery, "evaluate", scripted_evaluate(FORGETTING_SCRIPT))
    assert (
        main(
            [
                "mastery",
                "run",
                str(CONFIGS / "quick" / "forgetting.yaml"),
                *tiny(
                    scenes,
                    tmp_path,
                    "train.criterion=0.75",
                    "forgetting.after_episodes=[1, 2]",
                    "forgetting.subepoch_trials=150",
                    "forgetting.max_subepochs=3",
                ),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Forgetting (the new task trained alone" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))]
    forgetting_rows = [r for r in rows if len(r) >= 7 and r[-2] == "->"]
    assert [(r[0], r[3], r[4], r[5], r[7]) for r in forgetting_rows] == [
        ("1", "2", "0.900", "0.900", "0.700"),
        ("2", "3", "0.700", "0.900", "0.600"),
    ]


# ------------------------------------------------------------------ the allocator
def test_a_cpu_mastery_run_tunes_the_allocator(scenes, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        mastery, "tune_malloc", lambda: calls.append(1) or allocator.MallocTuning("tuned", "tuned (test)")
    )
    monkeypatch.setattr(mastery, "evaluate", scripted_evaluate([[0.99]]))
    run_dir, _, _ = run_config(None, tiny(scenes, tmp_path, "tasks.num_tasks=1"))
    assert calls == [1] and "allocator: tuned (test)" in (run_dir / "log.txt").read_text()
