# loom_add_plugin(<target> SOURCES <src>... [OUTPUT_DIRECTORY <dir>] [INSTALL_DESTINATION <dir>])
#
# Builds a Loom plugin the way every plugin is built, Loom's own included: a MODULE library
# against Loom::plugin_api only, hidden visibility for everything but loom_plugin_entry, no
# undefined symbols left for the host to provide. Works in Loom's tree and, through
# find_package(Loom), in a third party's.
function(loom_add_plugin target)
  cmake_parse_arguments(ARG "" "OUTPUT_DIRECTORY;INSTALL_DESTINATION" "SOURCES" ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "loom_add_plugin(${target}): SOURCES is required")
  endif()
  add_library(${target} MODULE ${ARG_SOURCES})
  target_link_libraries(${target} PRIVATE Loom::plugin_api)
  set_target_properties(${target} PROPERTIES
    PREFIX "lib"
    C_VISIBILITY_PRESET hidden
    CXX_VISIBILITY_PRESET hidden
    CUDA_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
  # Every symbol a plugin needs must come from its own link line, never from the host. (Not under
  # sanitizers: their runtime lives in the executable.)
  if(NOT APPLE AND NOT LOOM_SANITIZE)
    target_link_options(${target} PRIVATE "LINKER:--no-undefined")
  endif()
  # Hidden visibility alone still exports libstdc++ template instantiations (namespace std has
  # default visibility); a version script makes loom_plugin_entry the one exported symbol.
  if(NOT APPLE)
    set(map ${CMAKE_BINARY_DIR}/loom_plugin_exports.map)
    if(NOT EXISTS ${map})
      file(WRITE ${map} "{\n  global: loom_plugin_entry;\n  local: *;\n};\n")
    endif()
    target_link_options(${target} PRIVATE "LINKER:--version-script=${map}")
    set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS ${map})
  endif()
  if(ARG_OUTPUT_DIRECTORY)
    set_target_properties(${target} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${ARG_OUTPUT_DIRECTORY})
  endif()
  if(ARG_INSTALL_DESTINATION)
    install(TARGETS ${target} LIBRARY DESTINATION ${ARG_INSTALL_DESTINATION})
  endif()
endfunction()
