"""Explanations of registered models: Captum attributions (``attributions``), how they are asked
for (``options``) and drawn (``pictures``). Served at ``POST /models/<name>/explain``, printed by
``deepyard explain`` and logged by a train job's ``explain:`` block."""
