"""mmsep-finetune: turn a MMAudio generation checkpoint into a MMAudioSep separation ft.pt.

Stages: ``synthetic`` (a labelled toy corpus), ``data`` (the clip list and the mixtures),
``features`` (encoders and the resumable feature cache), ``recipe`` (the authors' training facts:
frozen parts, flow-matching loss, query dropout, EMA), ``loop`` (the trainer, DDP, checkpoints,
metrics) and ``cli`` (``mmsep-finetune``). Imports mmsep.models, never mmsep.export.
"""
