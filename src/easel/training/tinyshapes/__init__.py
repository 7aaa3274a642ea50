"""The bundled `tiny-shapes` model: its training recipe (`recipe.train_base`, settings in `config`),
its synthetic scenes and caption grammar (`data`, `tokenizer`), the decoder and denoiser tunes, and
the evaluators that judge what a model draws (`evaluate`, `evaluate_editing`, `analyser`).

The loop pieces every recipe shares (checkpoints, stage bookkeeping, optimizer, schedule,
precision) are `easel.training.loop`; `easel train base` and `easel eval` are in
`easel.training.commands`.
"""
