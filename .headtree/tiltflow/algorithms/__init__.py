"""Training algorithms: AC-DMD (stage 1) and RTDMD (stage 2); baselines are configurations of them."""
