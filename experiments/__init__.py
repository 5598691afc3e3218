"""The experiment machinery behind the commands search.py and ablate.py: many runs of main.py at a time.

`search_space` (the hyperparameters a search samples, and their checks), `search_study` (an Optuna study:
trials, pruning, the best trial's command) and `study_runs` (worker processes that train runs through main.py).
These modules may import main.py and everything below it (the run machinery, the model, `data`); only the
commands at the top import them.
"""
