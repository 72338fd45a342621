"""The Optuna search: TPE over a program's search space, studies kept in SQLite so a stopped run resumes.

``run_search(program, shape, objective, n_trials=...)`` asks the TPE sampler for
configs. A config that the space's constraints reject is pruned before anything
is compiled, and the reason is stored. An objective that raises (a compile
error, or output that failed its reference check) becomes a failed trial. The
returned value (milliseconds on the GPU, or any cost) is minimised. The study
lives in ``sqlite:///<cache dir>/studies.db`` unless ``storage`` says
otherwise. Running again with the same name continues until ``n_trials`` trials
have finished.
"""

import time

import optuna

from msa_tl.tuning.cache import cache_dir, shape_key
from msa_tl.tuning.spaces import SPACES


def storage_url(path=None) -> str:
    path = path or cache_dir() / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def run_search(program: str, shape: dict, objective, *, n_trials: int, gpu: str = "", timeout=None,
               storage=None, seed: int = 0, progress: bool = False) -> optuna.Study:
    space = SPACES[program]
    study = optuna.create_study(
        study_name=f"{gpu}|{shape_key(program, shape)}", storage=storage or storage_url(),
        sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize", load_if_exists=True)

    def trial_value(trial: optuna.Trial) -> float:
        config = {name: trial.suggest_categorical(name, list(choices)) for name, choices in space.params.items()}
        reason = space.reject(config, shape)
        if reason is not None:
            trial.set_user_attr("rejected", reason)
            raise optuna.TrialPruned(reason)
        return float(objective(config))

    done = sum(t.state.is_finished() for t in study.trials)
    if done < n_trials:
        study.optimize(trial_value, n_trials=n_trials - done, timeout=timeout, catch=(Exception,),
                       show_progress_bar=progress)
    return study


def lowering_cost(program: str, shape: dict):
    """A real, GPU-free objective: seconds to lower the program for sm_90a with the config."""
    from msa_tl import index_scores, index_topk, kv_outer_attention, lse_combine
    from msa_tl.tl_compile import lower_to_cuda

    fixed = {
        "index_block_scores": (index_scores.block_scores_program,
                               dict(groups=shape["groups"], index_dim=shape["index_dim"],
                                    block_size=shape["block_size"], scale=shape["index_dim"] ** -0.5)),
        "index_select_fused": (index_topk.fused_select_program,
                               dict(groups=shape["groups"], index_dim=shape["index_dim"],
                                    block_size=shape["block_size"], topk=shape["topk"])),
        "index_topk": (index_topk.topk_program,
                       dict(groups=shape["groups"], block_size=shape["block_size"], topk=shape["topk"])),
        "kv_outer_attention": (kv_outer_attention.kv_outer_program,
                               dict(groups=shape["groups"], heads=shape["heads"], head_dim=shape["head_dim"],
                                    block_size=shape["block_size"], topk=shape["topk"],
                                    scale=shape["head_dim"] ** -0.5)),
        "lse_combine": (lse_combine.combine_program,
                        dict(heads=shape["heads"], head_dim=shape["head_dim"], topk=shape["topk"])),
    }
    builder, args = fixed[program]

    def objective(config):
        start = time.perf_counter()
        lower_to_cuda(builder, **args, **config)
        return time.perf_counter() - start

    return objective
