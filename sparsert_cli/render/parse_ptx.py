def check_printed(ir, text):
    pass
