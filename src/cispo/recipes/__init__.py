"""Recipes: functions `recipe() -> TrainConfig`; `cispo train NAME` loads `cispo.recipes.NAME`."""
