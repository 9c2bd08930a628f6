"""Advice: the coach's pure rules, the coach that listens to a session's events, and the
autopilot that applies the coach's suggested actions within limits."""
