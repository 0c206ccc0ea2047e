use foobar_lab::lab::{Lab, LabSpec};

#[test]
fn smoke() {
    let mut lab = Lab::up(LabSpec::for_test("smoke", 2));
    lab.start_agent();
    let got: Vec<_> = (0..6).map(|_| lab.get()).collect();
    println!("{got:?}");
    println!("{}", lab.cli_ok(&["status"]));
    println!("{}", lab.cli_ok(&["stats"]));
    println!("{}", lab.agent_log());
}
