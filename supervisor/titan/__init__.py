"""titan"""
