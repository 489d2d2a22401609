"""agelens.flows: what runs the stages of agelens.tasks, and the service around them.

    pipeline/   the Prefect flow, the stage graph and its cache keys, the runner, the run's inputs,
                publishing (run table, report, artifacts), the run's settings, the demo data
    registry/   each configuration's champion model and every decision about it
    predict/    ages of new photos with a champion: `agelens predict` and the `predict` flow
    sweep/      several settings run together and compared
    service/    the local Prefect server, locks, interrupts, deployments, the watcher and its
                state, gc, status, the checks before work
    cli/        the `agelens` command line
"""
