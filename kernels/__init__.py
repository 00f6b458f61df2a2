"""pdacscreen.kernels"""
