# The option types nixos-module/ and nixos-base.nix use, with real checks and merges.
# Each type is { name, description, check, merge }; merge gets the option's location and the
# definitions that passed `check`, as in nixpkgs' lib.types.
{ lib, modules }:

let
  inherit (builtins)
    all attrNames concatLists concatStringsSep elemAt filter genList head isAttrs isBool
    isFloat isFunction isInt isList isPath isString length match;

  showLoc = concatStringsSep ".";

  mkOptionType = { name, description ? name, check ? (_: true), merge ? mergeEqual }:
    { _type = "option-type"; inherit name description check merge; };

  # Several definitions of a scalar must agree.
  mergeEqual = loc: defs:
    let first = (head defs).value;
    in if all (d: d.value == first) defs then first
       else throw "The option `${showLoc loc}' has conflicting definition values: ${concatStringsSep ", " (map (d: lib.showValue d.value) defs)}";

  isDerivation = x: isAttrs x && (x.type or null) == "derivation";

  listOf = elemType: mkOptionType {
    name = "listOf";
    description = "list of ${elemType.description}";
    check = isList;
    merge = loc: defs:
      concatLists (map
        (d: genList
          (i: modules.mergeDefinitions (loc ++ [ "[${toString i}]" ]) elemType [ (elemAt d.value i) ] [ ])
          (length d.value))
        defs);
  };

  attrsOf = elemType: mkOptionType {
    name = "attrsOf";
    description = "attribute set of ${elemType.description}";
    check = isAttrs;
    merge = loc: defs:
      let
        perName = modules.attrDefs defs;
        # An attribute whose every definition is mkIf false is absent, as in nixpkgs.
        present = filter (n: modules.dischargeAll (loc ++ [ n ]) perName.${n} != [ ]) (attrNames perName);
      in lib.genAttrs present (n: modules.mergeDefinitions (loc ++ [ n ]) elemType perName.${n} [ ]);
  };

  self = rec {
    inherit mkOptionType isDerivation;

    bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; };
    int = mkOptionType { name = "int"; description = "signed integer"; check = isInt; };
    ints = {
      unsigned = mkOptionType {
        name = "unsignedInt";
        description = "unsigned integer, meaning >=0";
        check = x: isInt x && x >= 0;
      };
      u16 = mkOptionType {
        name = "u16";
        description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)";
        check = x: isInt x && x >= 0 && x <= 65535;
      };
    };
    port = ints.u16;
    str = mkOptionType { name = "str"; description = "string"; check = isString; };
    lines = mkOptionType {
      name = "lines";
      description = "strings concatenated with \"\\n\"";
      check = isString;
      merge = loc: defs: concatStringsSep "\n" (map (d: d.value) defs);
    };
    strMatching = pattern: mkOptionType {
      name = "strMatching ${lib.strings.escapeNixString pattern}";
      description = "string matching the pattern ${pattern}";
      check = x: isString x && match pattern x != null;
    };
    path = mkOptionType {
      name = "path";
      description = "path";
      check = x: isPath x || (isString x && builtins.substring 0 1 x == "/");
    };
    package = mkOptionType {
      name = "package";
      description = "package";
      check = x: isDerivation x;
    };
    anything = mkOptionType { name = "anything"; description = "anything"; };
    attrs = mkOptionType {
      name = "attrs";
      description = "attribute set";
      check = isAttrs;
      merge = loc: defs: lib.foldl' (a: d: a // d.value) { } defs;
    };

    inherit listOf attrsOf;

    nullOr = elemType: mkOptionType {
      name = "nullOr";
      description = "null or ${elemType.description}";
      check = x: x == null || elemType.check x;
      merge = loc: defs:
        let nulls = filter (d: d.value == null) defs;
        in if nulls == defs then null
           else if nulls == [ ] then elemType.merge loc defs
           else throw "The option `${showLoc loc}' is defined both null and not null.";
    };

    either = a: b: mkOptionType {
      name = "either";
      description = "${a.description} or ${b.description}";
      check = x: a.check x || b.check x;
      merge = loc: defs:
        if all (d: a.check d.value) defs then a.merge loc defs
        else if all (d: b.check d.value) defs then b.merge loc defs
        else throw "The option `${showLoc loc}' has definitions of both ${a.description} and ${b.description}.";
    };

    oneOf = ts: lib.foldl' either (head ts) (lib.drop 1 ts);

    # A nested module with its own options (systemd.services.<name>, assertions, ...).
    submodule = options: mkOptionType {
      name = "submodule";
      description = "submodule";
      check = x: isAttrs x || isFunction x;
      merge = loc: defs:
        (modules.evalModules {
          prefix = loc;
          modules = [ { inherit options; } ]
            ++ map (d: if isFunction d.value then d.value else { config = d.value; }) defs;
        }).config;
    };

    # pkgs.formats.json's value type: JSON values, attribute sets merged key by key and
    # lists concatenated.
    json = mkOptionType {
      name = "json";
      description = "JSON value";
      check = x: x == null || isBool x || isInt x || isFloat x || isString x || isPath x || isList x || isAttrs x;
      merge = loc: defs:
        if all (d: isAttrs d.value) defs then (attrsOf json).merge loc defs
        else if all (d: isList d.value) defs then (listOf json).merge loc defs
        else mergeEqual loc defs;
    };
  };
in
self
