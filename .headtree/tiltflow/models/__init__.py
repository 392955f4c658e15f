"""Backbones: the protocol every world implements, CFG, EMA and the small models of the analytic world."""
