"""pdacscreen.engine"""
