# 此為讓 functions 目錄被視為一個套件的空模組 (the functions folder is a package, as in the seed)
