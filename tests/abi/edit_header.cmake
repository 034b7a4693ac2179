# cmake -DSRC=<include dir> -DDST=<copy> -DHEADER=<name under loom/> -DFIND=<text> -DREPLACE=<text>
#       -P edit_header.cmake
# Copies the ABI headers and replaces FIND by REPLACE (literal) in one of them; fails when FIND
# does not occur, so that a variant never silently tests an unmodified copy. A semicolon is
# written @SEMI@ in FIND and REPLACE (CMake would split the argument into a list at a ';').
file(REMOVE_RECURSE ${DST})
file(COPY ${SRC}/ DESTINATION ${DST})
string(REPLACE "@SEMI@" ";" FIND "${FIND}")
string(REPLACE "@SEMI@" ";" REPLACE "${REPLACE}")
file(READ ${DST}/loom/${HEADER} text)
string(FIND "${text}" "${FIND}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "edit_header: '${FIND}' not found in loom/${HEADER}")
endif()
string(REPLACE "${FIND}" "${REPLACE}" text "${text}")
file(WRITE ${DST}/loom/${HEADER} "${text}")
