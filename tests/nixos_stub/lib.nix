# A stand-in for nixpkgs' `lib`: the functions nixos-module/ and the stub itself use, with
# nixpkgs' names and meanings.  Types live in ./types.nix, the module system in ./modules.nix.
let
  inherit (builtins)
    attrNames concatMap concatStringsSep elem filter foldl' genList head isAttrs isBool
    isFloat isFunction isInt isList isPath isString length listToAttrs match substring tail
    toJSON;

  lib = {
    inherit concatStringsSep foldl';

    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: lib.mkOption {
      type = lib.types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };
    literalExpression = text: { _type = "literalExpression"; inherit text; };

    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkOptionDefault = lib.mkOverride 1500;
    mkDefault = lib.mkOverride 1000;
    mkForce = lib.mkOverride 50;
    mkOrder = priority: content: { _type = "order"; inherit priority content; };
    mkBefore = lib.mkOrder 500;
    mkAfter = lib.mkOrder 1500;

    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: as: if cond then as else { };
    optionalString = cond: s: if cond then s else "";
    concatMapStringsSep = sep: f: list: concatStringsSep sep (map f list);
    hasPrefix = prefix: s: substring 0 (builtins.stringLength prefix) s == prefix;
    hasInfix = infix: s: builtins.match ".*${lib.escapeRegex infix}.*" s != null;
    escapeRegex = builtins.replaceStrings
      [ "\\" "[" "]" "{" "}" "(" ")" "." "*" "+" "?" "^" "$" "|" ]
      [ "\\\\" "\\[" "\\]" "\\{" "\\}" "\\(" "\\)" "\\." "\\*" "\\+" "\\?" "\\^" "\\$" "\\|" ];
    toInt = s:
      if match "[0-9]+" s == null then throw "toInt: could not convert ${toJSON s} to int."
      else builtins.fromJSON s;
    drop = n: list: genList (i: builtins.elemAt list (i + n)) (lib.max 0 (length list - n));
    max = a: b: if a > b then a else b;
    unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
    sort = builtins.sort;
    mapAttrs = builtins.mapAttrs;
    genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
    recursiveUpdate = lhs: rhs:
      lhs // builtins.mapAttrs
        (n: v: if isAttrs v && isAttrs (lhs.${n} or null) then lib.recursiveUpdate lhs.${n} v else v)
        rhs;

    # Enough of lib.generators.toPretty for error messages.
    showValue = v:
      if isString v then toJSON v
      else if isFunction v then "<function>"
      else if isPath v then toString v
      else if isAttrs v && v ? outPath then "<derivation ${v.name or "?"}>"
      else toJSON v;

    strings.escapeNixString = s: toJSON s;

    cleanSourceWith = { src, filter ? (_: _: true), name ? "source" }:
      builtins.path { path = src; inherit name filter; };

    licenses.gpl3Plus = { spdxId = "GPL-3.0-or-later"; };
    platforms.linux = [ "x86_64-linux" "aarch64-linux" ];

    types = import ./types.nix { inherit lib; modules = lib.modules; };
    modules = import ./modules.nix { inherit lib; };
    inherit (lib.modules) evalModules;
  };
in
lib
