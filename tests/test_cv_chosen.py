"""configs/cv_chosen: each dataset's settings are the ones its cross-validation report chose."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_router.apps.train import layout_mismatch
from tests.test_training import compose_config

REPO = Path(__file__).resolve().parents[1]
CHOSEN = REPO / "configs" / "cv_chosen"
REPORTS = REPO / "reports" / "cv"


def fold_choices(report: dict) -> dict[str, Counter]:
    """setting -> Counter of the values the report's folds chose (both CV scripts' layouts)."""
    choices: dict[str, Counter] = {}
    for fold in report["folds"]:
        picked = {k: fold[k] for k in ("label_weight", "linear_weight") if k in fold}
        for part in (
            fold.get("candidate") or ""
        ).split():  # cv.py: 'defaults' | 'model.prototypes_per_expert=512 linear_weight=1'
            key, _, value = part.partition("=")
            if key == "linear_weight":
                picked[key] = float(value)
        for key, value in picked.items():
            choices.setdefault(key, Counter())[float(value)] += 1
    return choices


def reports() -> list[Path]:
    """The finished CV reports (a running one keeps <data>.partial.json beside them)."""
    return sorted(p for p in REPORTS.glob("*.json") if not p.name.endswith(".partial.json"))


def chosen_files() -> list[Path]:
    return sorted(CHOSEN.glob("*.yaml"))


def test_cv_chosen_files_exist_for_the_datasets_whose_reports_choose_a_linear_weight() -> None:
    choosing = {p.stem for p in reports() if "linear_weight" in fold_choices(json.loads(p.read_text()))}
    assert choosing and choosing == {p.stem for p in chosen_files()}


@pytest.mark.parametrize("path", chosen_files(), ids=lambda p: p.stem)
def test_cv_chosen_settings__are_the_most_common_fold_choice_of_the_report(path: Path) -> None:
    choices = fold_choices(json.loads((REPORTS / f"{path.stem}.json").read_text()))
    settings = OmegaConf.to_container(OmegaConf.load(path))
    flat = {"linear_weight": settings.get("linear_weight"), **settings.get("targets", {})}
    flat = {k: v for k, v in flat.items() if v is not None}
    assert set(flat) == set(choices)  # every setting the report chose is set, and nothing else
    for key, value in flat.items():
        assert float(value) == choices[key].most_common(1)[0][0], (key, choices[key])


def test_train_config__applies_the_dataset_choice_after_train_yaml_and_a_command_line_override_wins() -> None:
    assert compose_config("train", ["data=stackoverflow20"]).linear_weight == 0.5
    assert compose_config("train", ["data=clinc150"]).targets.label_weight == 0.75
    assert compose_config("train", ["data=demo"]).linear_weight == 0.0  # no file: train.yaml's value
    assert compose_config("train", ["data=classic", "linear_weight=0"]).linear_weight == 0.0


CHOSEN_EVAL = REPO / "configs" / "cv_chosen_eval"


def chosen_point(report: dict) -> tuple[tuple, int]:
    """The most common operating point the report's folds chose, and in how many folds."""
    points = Counter(
        (p["setting"], int(p["max_experts"]), float(p["prior_weight"]), float(p.get("decide_weight", 0.0)))
        for p in (fold["chosen"] for fold in report["folds"])
    )
    return points.most_common(1)[0]


def retrieval_reports() -> list[Path]:
    return sorted(p for p in reports() if "ndcg@10@chosen" in json.loads(p.read_text())["folds"][0])


@pytest.mark.parametrize("path", retrieval_reports(), ids=lambda p: p.stem)
def test_cv_chosen_eval__is_the_point_most_folds_chose_when_most_chose_one_top_p_point(path: Path) -> None:
    report = json.loads(path.read_text())
    (setting, cap, prior, decide), count = chosen_point(report)
    file = CHOSEN_EVAL / f"{path.stem}.yaml"
    majority = setting.startswith("p=") and decide == 0.0 and count > len(report["folds"]) / 2
    assert file.exists() == majority, (path.stem, setting, count)
    if majority:
        point = OmegaConf.load(file)
        assert (point.top_p, point.max_experts) == (float(setting[2:]), cap)
        assert OmegaConf.load(CHOSEN / f"{path.stem}.yaml").prior_weight == prior  # the checkpoint's half


def test_eval_config__applies_the_dataset_point_and_a_command_line_override_wins() -> None:
    assert (
        compose_config("eval", ["data=stackexchange"]).top_p,
        compose_config("eval", ["data=stackexchange"]).max_experts,
    ) == (0.99, 4)
    assert compose_config("eval", ["data=classic"]).top_p == 0.8  # no file: eval.yaml's value
    assert compose_config("eval", ["data=stackexchange", "top_p=0.9"]).top_p == 0.9
    assert compose_config("train", ["data=stackexchange"]).prior_weight == 0.05


@pytest.mark.parametrize(
    ("overrides", "differs"),
    [
        (["data=stackoverflow20", "partition=16"], "partition=null, but this run trains partition=16"),
        (["data=clinc150", "data.expert_key=label"], "expert_key=domain, but this run trains expert_key=label"),
        (["data=classic", "partition=8"], "partition=null, but this run trains partition=8"),
    ],
)
def test_layout_mismatch__warns_when_the_chosen_settings_were_cross_validated_for_other_experts(
    overrides: list[str], differs: str
) -> None:
    message = layout_mismatch(compose_config("train", overrides))
    assert message is not None and differs in message
    assert f"configs/cv_chosen/{overrides[0].split('=')[1]}.yaml" in message and "~cv_chosen" in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=stackoverflow20"],
        ["data=classic"],
        ["data=demo", "partition=4"],  # no cv_chosen file for demo: nothing was chosen, nothing to warn about
        ["data=stackoverflow20", "partition=16", "~cv_chosen"],  # the way out the warning names
    ],
)
def test_layout_mismatch__is_silent_for_the_layout_cross_validated_and_without_a_chosen_file(
    overrides: list[str],
) -> None:
    assert layout_mismatch(compose_config("train", overrides)) is None


def report_layout(stem: str) -> dict[str, object]:
    """The layout a report's cross-validation trained: its data, the partition its --train gave (or none), and
    the expert_key when --train set one."""
    text = (REPORTS / f"{stem}.md").read_text()
    command = text.split("Written by `", 1)[1].split("`", 1)[0]
    data = command.split("--data ", 1)[1].split()[0]
    words = command.split()
    layout = {"data": data, "partition": next((int(w[10:]) for w in words if w.startswith("partition=")), None)}
    for w in words:
        if w.startswith("data.expert_key="):
            layout["expert_key"] = w.split("=")[1]
        if w.startswith("partition_max_imbalance="):
            layout["partition_max_imbalance"] = float(w.split("=")[1])
    if layout["partition"] is not None:
        layout.setdefault("partition_max_imbalance", None)  # plain k-means unless the command capped it
    return layout


@pytest.mark.parametrize("path", chosen_files(), ids=lambda p: p.stem)
def test_every_chosen_file_names_the_layout_its_report_cross_validated(path: Path) -> None:
    chosen_for = OmegaConf.load(path).get("chosen_for")
    assert chosen_for is not None
    layout = report_layout(path.stem)
    assert {k: chosen_for.get(k) for k in layout} == layout


def test_chosen_files__name_distinct_layouts() -> None:
    layouts = [str(dict(OmegaConf.load(p).chosen_for)) for p in chosen_files()]
    assert len(set(layouts)) == len(layouts)


def test_layout_mismatch__names_the_file_cross_validated_for_the_run_layout() -> None:
    message = layout_mismatch(compose_config("train", ["data=stackoverflow20", "partition=16"]))
    assert message is not None and "configs/cv_chosen/stackoverflow20.yaml" in message
    assert "add cv_chosen=stackoverflow20_kmeans16" in message and "~cv_chosen" in message
    layout = ["data=stackoverflow20", "partition=16", "cv_chosen=stackoverflow20_kmeans16"]
    assert layout_mismatch(compose_config("train", layout)) is None
    assert compose_config("train", layout).linear_weight == 1.0


def test_layout_mismatch__names_the_applied_file_when_it_is_not_the_data_s_own() -> None:
    message = layout_mismatch(
        compose_config("train", ["data=stackoverflow20", "partition=32", "cv_chosen=stackoverflow20_kmeans16"])
    )
    assert message is not None and "configs/cv_chosen/stackoverflow20_kmeans16.yaml" in message
    assert "partition=16, but this run trains partition=32" in message and "add ~cv_chosen" in message
    message = layout_mismatch(compose_config("train", ["data=classic", "cv_chosen=stackexchange"]))
    assert message is not None and "configs/cv_chosen/stackexchange.yaml" in message
    assert "data=stackexchange, but this run trains data=classic" in message and "add cv_chosen=classic" in message


def test_layout_mismatch_without_the_configs_folder__still_warns_naming_the_data_file(tmp_path: Path) -> None:
    message = layout_mismatch(compose_config("train", ["data=stackoverflow20", "partition=16"]), tmp_path / "none")
    assert message is not None and "configs/cv_chosen/stackoverflow20.yaml" in message and "add ~cv_chosen" in message


def test_layout_mismatch__tells_size_capped_shards_from_plain_ones() -> None:
    capped = ["data=stackoverflow20", "partition=64", "partition_max_imbalance=1.5"]
    message = layout_mismatch(compose_config("train", [*capped, "cv_chosen=stackoverflow20_kmeans64"]))
    assert message is not None and "configs/cv_chosen/stackoverflow20_kmeans64.yaml" in message
    assert "partition_max_imbalance=null, but this run trains partition_max_imbalance=1.5" in message
    plain = ["data=stackoverflow20", "partition=64", "cv_chosen=stackoverflow20_kmeans64"]
    assert layout_mismatch(compose_config("train", plain)) is None
