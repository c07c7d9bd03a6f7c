"""Studies: one-off work that chose a setting (cross-validation) or compared the alternatives."""
