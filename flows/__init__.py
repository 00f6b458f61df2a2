"""pdacscreen.flows"""
