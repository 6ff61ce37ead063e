"""The PALP objective: the loss terms as pure functions (losses), one training step (task) and a trial
group's step (group)."""
