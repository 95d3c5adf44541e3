"""The site's differential-privacy mechanism, as Opacus splits its own: the settings (`settings`), the engine
that wraps a model with Opacus and calibrates σ (`engine`), the DP-SGD step over length-sorted micro-batches
(`step`), the accountant's ledger and the site identity it belongs to (`ledger`, `enrolment`), and the OS-CSPRNG
sampling and noise of secure mode (`secure_rng`). It imports nothing else of fl_client, and no Flower."""
