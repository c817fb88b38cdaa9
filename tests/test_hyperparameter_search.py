"""``trainer.hyperparameter_search`` (Optuna) varies the DropGrad settings per trial: each trial
trains with its own rate table, and its logs and records say so."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
optuna = pytest.importorskip("optuna")

from transformers import TrainerCallback  # noqa: E402

from hf_dropgrad import DropGradTrainer, DropGradTrainingArguments, get_dropgrad  # noqa: E402
from tests.trainer_helpers import classification_data, common, tiny_bert_classifier  # noqa: E402

pytestmark = pytest.mark.slow

RATES = [0.0, 0.5]
MODULE_RATES = ["", "bert.encoder=0.9"]  # "" is no module rates (None is not an Optuna choice)


class RecordTrials(TrainerCallback):
    """What each trial trained with: its parameters, rates, log history and record."""

    def __init__(self) -> None:
        self.trials: list[dict] = []

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        dropgrad = get_dropgrad(optimizer)
        self.trials.append({
            "params": dict(state.trial_params),
            "rates": dropgrad.current_rates(),
            "logs": [dict(e) for e in state.log_history if "loss" in e],
            "record": state.stateful_callbacks["hf_dropgrad"]["attributes"]["settings"],
            "config": {k: v for k, v in args.to_dict().items() if k.startswith("dropgrad_")},
        })


def hp_space(trial) -> dict:
    return {
        "dropgrad_rate": trial.suggest_categorical("dropgrad_rate", RATES),
        "dropgrad_module_rates": trial.suggest_categorical("dropgrad_module_rates", MODULE_RATES),
    }


def test_optuna_search_varies_the_rate_and_the_module_rates_per_trial(tmp_path) -> None:
    args = DropGradTrainingArguments(**common(tmp_path, max_steps=2, logging_steps=1))
    recorder = RecordTrials()
    trainer = DropGradTrainer(
        model_init=lambda trial=None: tiny_bert_classifier(), args=args,
        train_dataset=classification_data(), eval_dataset=classification_data(8),
        callbacks=[recorder],
    )
    grid = {"dropgrad_rate": RATES, "dropgrad_module_rates": MODULE_RATES}
    best = trainer.hyperparameter_search(
        hp_space=hp_space, backend="optuna", n_trials=4, direction="minimize",
        sampler=optuna.samplers.GridSampler(grid, seed=0),
    )
    assert set(best.hyperparameters) == {"dropgrad_rate", "dropgrad_module_rates"}
    assert sorted((t["params"]["dropgrad_rate"], t["params"]["dropgrad_module_rates"])
                  for t in recorder.trials) == [(r, m) for r in RATES for m in MODULE_RATES]

    names = [name for name, _ in tiny_bert_classifier().named_parameters()]
    encoder = [name for name in names if name.startswith("bert.encoder.")]
    for trial in recorder.trials:
        params = trial["params"]
        rate, module_rates = params["dropgrad_rate"], params["dropgrad_module_rates"]
        # The rate table: the default rate everywhere (0 is an exact no-op), or with module
        # rates the encoder's, and the default rate elsewhere (none when it is 0).
        if module_rates:
            expected = {name: rate for name in names if rate > 0}
            expected.update({name: 0.9 for name in encoder})
        else:
            expected = dict.fromkeys(names, rate)
        assert trial["rates"] == expected, params
        # The logs: each step's rates, by source; none at all when the trial is DropGrad off.
        logged = {"dropgrad_rate": rate} if rate > 0 else {}
        if module_rates:
            logged["dropgrad_rate/bert.encoder"] = 0.9
        assert len(trial["logs"]) == 2
        for entry in trial["logs"]:
            assert {k: v for k, v in entry.items() if k.startswith("dropgrad_rate")} == logged
        # The record in trainer_state.json and the run configuration the trackers log.
        assert trial["record"]["drop_rate"] == rate
        assert trial["record"]["module_rates"] == ({"bert.encoder": 0.9} if module_rates else None)
        if logged:
            assert trial["config"]["dropgrad_rate"] == rate
            assert trial["config"]["dropgrad_module_rates"] == trial["record"]["module_rates"]
