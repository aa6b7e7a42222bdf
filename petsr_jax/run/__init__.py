"""A run's folder, owned in one place: what it holds, which run it is, who writes it.

    layout.py      every file name of a workdir, said once; the one reader of its records
                   (config.json, data_info.json, results.json, ...); its checkpointed steps
    identity.py    which run a workdir holds: the recorded config against a new one, the
                   fields that define a run, fingerprints and default workdir names, and the
                   refusals (another run's workdir, a folder of scans) before anything is written
    lock.py        one writer per folder: WorkdirLock, stale locks, what a reader is told
    record.py      run.json, and how far a run got (`progress`, `never_checkpointed`)
    checkpoint.py  Orbax: full states to resume, best params, the config each step was trained
                   with, fallbacks and clear errors; free space for them

Writing goes through `petsr_jax.io.files` (whole or not at all). The modules are imported by
name (`from petsr_jax.run import identity, layout`); this package imports none of them, so
asking for a workdir's name does not load Orbax.
"""
