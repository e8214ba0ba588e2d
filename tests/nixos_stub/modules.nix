# A small model of the nixpkgs module system, enough to evaluate nixos-module/ for real.
#
# What it keeps from the real one (so the tests mean something): option declarations merged
# from every module; definitions pushed through mkIf/mkMerge/mkOverride/mkOrder without
# forcing conditions early; the lowest-priority definitions win; every definition is checked
# against its option's type, with nested checks inside list/attrset/submodule merges;
# defining an option nobody declared is an error; a used option without a value is an error.
# What it leaves out: _module.args beyond specialArgs, option docs, freeformType, renames.
{ lib }:

let
  inherit (builtins)
    all attrNames concatLists concatMap filter foldl' head isAttrs isBool isFunction isPath
    isString length tail;

  isType = type: x: isAttrs x && (x._type or null) == type;
  isOption = isType "option";
  showLoc = lib.concatStringsSep ".";

  # Definitions of the option at `path` found inside one definition tree; properties are
  # pushed inward so mkIf conditions are not forced just to find out what is defined.
  defsAt = path: def:
    if path == [ ] then [ def ]
    else if isType "if" def then map (lib.mkIf def.condition) (defsAt path def.content)
    else if isType "merge" def then concatMap (defsAt path) def.contents
    else if isType "override" def then map (lib.mkOverride def.priority) (defsAt path def.content)
    else if isType "order" def then map (lib.mkOrder def.priority) (defsAt path def.content)
    else if isAttrs def && def ? ${head path} then defsAt (tail path) def.${head path}
    else [ ];

  # One definition with its properties evaluated: a list of { value, priority, order }.
  discharge = loc: def:
    if isType "if" def then
      (if !isBool def.condition
       then throw "mkIf called with a non-Boolean condition at `${showLoc loc}'"
       else if def.condition then discharge loc def.content else [ ])
    else if isType "merge" def then concatMap (discharge loc) def.contents
    else if isType "override" def then
      map (d: d // { priority = def.priority; }) (discharge loc def.content)
    else if isType "order" def then map (d: d // { order = def.priority; }) (discharge loc def.content)
    else [ { value = def; priority = 100; order = 1000; } ];

  # The value of an option (or of an element of a compound type) from its raw definitions.
  mergeDefinitions = loc: type: rawDefs: fallback:
    let
      defs = concatMap (discharge loc) rawDefs ++ fallback;
      best = foldl' (a: d: if d.priority < a then d.priority else a) 100000 defs;
      chosen = lib.sort (a: b: a.order < b.order) (filter (d: d.priority == best) defs);
      checked = map
        (d:
          if type.check d.value then d
          else throw "A definition for option `${showLoc loc}' is not of type `${type.description}'. Definition value: ${lib.showValue d.value}")
        chosen;
    in
    if defs == [ ] then throw "The option `${showLoc loc}' is used but not defined."
    else type.merge loc checked;

  # Raw definitions of each attribute across attrset definitions (for attrsOf-like merges).
  attrDefs = defs:
    let names = lib.unique (concatMap (d: attrNames d.value) defs);
    in lib.genAttrs names (name: concatMap (d: if d.value ? ${name} then [ d.value.${name} ] else [ ]) defs);

  # Declarations from many modules, merged into one tree; a second declaration is an error.
  mergeDecls = path: a: b:
    if isOption a || isOption b then throw "The option `${showLoc path}' is declared twice."
    else a // lib.mapAttrs (n: v: if a ? ${n} then mergeDecls (path ++ [ n ]) a.${n} v else v) b;

  # Defining something that is not declared is an error, as in NixOS.
  checkDefined = path: decls: def:
    if isType "if" def || isType "override" def || isType "order" def then checkDefined path decls def.content
    else if isType "merge" def then all (checkDefined path decls) def.contents
    else if isOption decls then true
    else if !isAttrs def then throw "The option `${showLoc path}' is an attribute set of options, but is defined as ${lib.showValue def}."
    else all
      (name:
        if decls ? ${name} then checkDefined (path ++ [ name ]) decls.${name} def.${name}
        else throw "The option `${showLoc (path ++ [ name ])}' does not exist. Definition value: ${lib.showValue def.${name}}")
      (attrNames def);

  load = args: m:
    let
      v = if isPath m || isString m then import m else m;
      r = if isFunction v then v args else v;
      structured = r ? options || r ? config || r ? imports;
    in {
      imports = r.imports or [ ];
      options = if structured then r.options or { } else { };
      config = if structured then r.config or { } else removeAttrs r [ "_file" "key" ];
    };

  collect = args: modules:
    concatMap (m: let l = load args m; in [ l ] ++ collect args l.imports) modules;

  evalModules = { modules, specialArgs ? { }, prefix ? [ ] }:
    let
      args = specialArgs // { inherit config options lib; };
      loaded = collect args modules;
      options = foldl' (mergeDecls prefix) { } (map (m: m.options) loaded);
      build = path: decls:
        if isOption decls then
          mergeDefinitions (prefix ++ path) decls.type (concatMap (m: defsAt path m.config) loaded)
            (if decls ? default then [ { value = decls.default; priority = 1500; order = 1000; } ] else [ ])
        else lib.mapAttrs (name: build (path ++ [ name ])) decls;
      config = build [ ] options;
      checks = map (m: checkDefined prefix options m.config) loaded;
    in {
      inherit options;
      # Checking forces every module's definitions; done only for the result handed out, so a
      # module can read `config` while the checks run.
      config = builtins.deepSeq checks config;
    };
in
{
  inherit attrDefs evalModules mergeDefinitions;
  dischargeAll = loc: concatMap (discharge loc);
}
