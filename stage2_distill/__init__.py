"""stage2_distill"""
