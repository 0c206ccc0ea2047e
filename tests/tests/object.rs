//! The compiled data plane, checked as an object: no call of the byte-loop `memset`,
//! `memcpy` or `memmove` subprograms LLVM emits for a zeroed or copied struct (20-36 ns
//! a call on the packet path).

use foobar_lb::dataplane::PROGRAM_OBJECT;
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind};

#[test]
fn the_program_calls_no_byte_loop_subprogram() {
    let file = object::File::parse(PROGRAM_OBJECT).expect("an ELF object");
    let mut calls = Vec::new();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        for (_, relocation) in section.relocations() {
            if let RelocationTarget::Symbol(index) = relocation.target()
                && let Ok(symbol) = file.symbol_by_index(index)
                && let Ok(name) = symbol.name()
                && ["memset", "memcpy", "memmove"].contains(&name)
            {
                calls.push(format!("{} calls {name}", section.name().unwrap_or("?")));
            }
        }
    }
    assert!(calls.is_empty(), "{calls:?}");
}
