"""pdacscreen.io"""
