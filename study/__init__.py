"""The research harness: `rcgrpo study` trains every variant of a study config on equal rollouts and
seeds, then scores, analyses and reports them (docs/STUDY.md)."""
