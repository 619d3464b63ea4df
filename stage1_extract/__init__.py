"""stage1_extract"""
