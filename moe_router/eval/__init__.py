"""Offline evaluation: every router side by side, the baselines, reports and plots (Lightning-free)."""
